"""`python -m leo_jax.generate --ckpt DIR [--image PATH ...] --prompt TEXT [[--image PATH ...] --prompt TEXT ...]`

Answers with the model in DIR: a training workdir (its newest checkpoint), its checkpoints/ directory, one step
directory, a `convert import-hf` checkpoint or an exported model directory. `--mesh fsdp=8` (or data=2,tensor=4)
spreads the parameters over the devices by their logical axes.
Each --prompt takes the --image flags given since the previous --prompt. One prompt: the answer is printed token by
token as it is generated; several: they run as one left-padded batch and each answer is printed.
--chat: a conversation on stdin, one user turn per line, the history (previous questions, answers and images) kept;
the command-line images go with the first turn, a line `/image PATH` attaches an image to the next turn, `/reset`
starts over, `/quit` or end of input ends.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TextIO

from PIL import Image


class _Ordered(argparse.Action):
    """Keeps --image / --prompt in command-line order (a prompt owns the images given before it)."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.items = (getattr(namespace, "items", None) or []) + [(self.dest, value)]


def group_requests(items: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[('image', p), ('prompt', t), ...] -> [(prompt, [its images]), ...]; raises ValueError on trailing images."""
    groups, images = [], []
    for kind, value in items:
        if kind == "image":
            images.append(value)
        else:
            groups.append((value, images))
            images = []
    if images:
        raise ValueError(f"--image {images[-1]} is not followed by a --prompt (each prompt takes the images given "
                         "before it)")
    return groups


def check_image(path: str) -> None:
    """Raises ValueError naming the file when it is missing or not a readable image."""
    if not os.path.isfile(path):
        raise ValueError(f"--image {path}: file not found")
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"--image {path}: not a readable image ({e})") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m leo_jax.generate", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training workdir, its checkpoints/ directory, a step dir, an "
                        "import-hf checkpoint or an exported model directory")
    parser.add_argument("--image", dest="image", action=_Ordered, help="image for the next --prompt (repeatable)")
    parser.add_argument("--prompt", dest="prompt", action=_Ordered, help="a question (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--system", default=None, help="system prompt (default: the template's)")
    parser.add_argument("--dtype", default=None, help="cast the parameters, e.g. bfloat16 (default: as saved)")
    parser.add_argument("--mesh", default=None, help="spread the parameters over the devices by their logical axes, "
                        "e.g. fsdp=8 or data=2,tensor=4 (default: one device)")
    parser.add_argument("--chat", action="store_true", help="read user turns from stdin, keeping the history")
    return parser


def run_chat(engine, sampling, seed: int, images: list[str], system: str | None, stdin: TextIO, out: TextIO) -> None:
    from leo_jax.infer.chat import Chat, InputError

    chat = Chat(engine, system)
    interactive = stdin.isatty()
    pending = list(images)
    while True:
        if interactive:
            out.write(">>> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return
        text = line.rstrip("\n")
        if text.startswith("/image "):
            path = text[len("/image "):].strip()
            try:
                check_image(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            pending.append(path)
            continue
        if text.strip() == "/reset":
            chat, pending = Chat(engine, system), []
            continue
        if not text.strip():
            continue
        try:
            pieces = chat.ask_stream(text, pending, sampling, seed)
            out.write("assistant: ")
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
            pending = []
        except InputError as e:
            out.write("\n")
            print(f"error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    items = getattr(args, "items", None) or []
    try:
        if args.chat:
            if any(kind == "prompt" for kind, _ in items):
                raise ValueError("--chat reads the prompts from stdin; give only --image flags (for the first turn)")
            groups = []
        else:
            groups = group_requests(items)
            if not groups:
                raise ValueError("give at least one --prompt (or --chat)")
        for kind, value in items:
            if kind == "image":
                check_image(value)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from leo_jax.infer.chat import InferenceEngine, InputError, Request
    from leo_jax.infer.loading import load_any
    from leo_jax.sharding import mesh_from_flag

    try:
        mesh = None if args.mesh is None else mesh_from_flag(args.mesh)
        model, config = load_any(args.ckpt, dtype=args.dtype, mesh=mesh)
        engine = InferenceEngine(model, config)
        sampling = engine.sampling(args.max_new_tokens, args.temperature, args.top_p)
        if args.chat:
            run_chat(engine, sampling, args.seed, [v for k, v in items if k == "image"], args.system, stdin, out)
            return 0
        requests = [Request.single(prompt, images, args.system) for prompt, images in groups]
        if len(requests) == 1:
            for piece in engine.stream(requests[0], sampling, args.seed):
                out.write(piece)
                out.flush()
            out.write("\n")
        else:
            for index, ((prompt, _), answer) in enumerate(zip(groups, engine.generate(requests, sampling,
                                                                                       args.seed))):
                out.write(f"[{index}] {prompt}\n{answer}\n")
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
