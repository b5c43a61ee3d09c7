"""`LeoProcessor`: images + chats -> the inputs of `LeoModel` / `LeoMiniForCausalLM`, from an exported directory's
files alone (tokenizer.json or tokenizer.model, tokenizer_config.json with the training template,
preprocessor_config.json, config.json). It runs the training pipeline's own host code (leo_jax.data templates,
tiling and image preprocessing, none of which imports JAX), so a prompt is token for token what the JAX engine
feeds the model.

    processor = LeoProcessor.from_pretrained(export_dir)
    model = LeoMiniForCausalLM.from_pretrained(export_dir)
    inputs = processor([[{"role": "user", "content": "<image>\\nWhat color is the square?"}]], [["img.png"]])
    tokens = model.generate(**inputs, **processor.generation_kwargs(max_new_tokens=16))
    processor.batch_decode(tokens)  -> ["red"]
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from leo_jax.data import image_processing, templates, tiling
from leo_jax.data.tokenizer import load_tokenizer
from leo_jax.jsonfile import read_json

_ROLES = {"user": "human", "assistant": "gpt", "system": "system", "human": "human", "gpt": "gpt"}


# Why a missing file matters, for `read_json`.
_NEEDED_FOR = "{} (export the model with `python -m leo_jax.convert export-hf`, which writes it)"


def load_image(source: Any, origin: str = "") -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a PIL image; ValueError naming the file when unreadable."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = source if isinstance(source, (str, Path)) else f"{len(source)} image bytes"
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        return image.convert("RGB")
    except FileNotFoundError as e:
        raise ValueError(f"{origin}image {name}: file not found") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{origin}image {name} cannot be read as an image ({e})") from e


def llava_turns(conversation: str | Sequence[dict]) -> list[dict]:
    """A prompt string or chat messages ({'role': 'system'|'user'|'assistant', 'content'} or LLaVA's
    {'from', 'value'}) -> LLaVA turns."""
    if isinstance(conversation, str):
        return [{"from": "human", "value": conversation}]
    turns = []
    for index, turn in enumerate(conversation):
        role, text = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role not in _ROLES or not isinstance(text, str):
            raise ValueError(f"message {index}: needs a role in {sorted(_ROLES)} and a text content, got {turn}")
        turns.append({"from": _ROLES[role], "value": text})
    return turns


class LeoTileInputs:
    """LEO ('leo'): each image is tiled (preprocessor_config.json 'tiling'; several images share max_tiles) and every
    tile goes to both encoders (`pixel_values`, `pixel_values_sam`), flattened over the batch with `image_flags`."""

    def __init__(self, pre_file: Path, pre: dict, config: dict, preprocessors: dict):
        self.tiling = pre.get("tiling")
        fields = ("tile_size", "min_tiles", "max_tiles", "use_thumbnail", "tokens_per_tile")
        if not isinstance(self.tiling, dict) or not all(field in self.tiling for field in fields):
            raise ValueError(f"{pre_file}: LEO needs a 'tiling' object with {list(fields)}, got {self.tiling!r}: "
                             "re-export the model")
        missing = [name for name in ("pixel_values", "pixel_values_sam") if name not in preprocessors]
        if missing:
            raise ValueError(f"{pre_file}: no encoder entry for LEO's input(s) {missing}: re-export the model")
        self.intern, self.sam = preprocessors["pixel_values"], preprocessors["pixel_values_sam"]

    def image_inputs(self, loaded: list[Image.Image]) -> tuple[tuple[list, list], list[int]]:
        """One row's images -> (its tiles for each encoder, visual tokens per image)."""
        t, tiles_1, tiles_2, counts = self.tiling, [], [], []
        for image in loaded:
            budget = tiling.tiles_per_image_budget(len(loaded), t["max_tiles"])
            tiles = tiling.tile_image(image, max_tiles=budget, tile=t["tile_size"], min_tiles=t["min_tiles"],
                                      use_thumbnail=t["use_thumbnail"])
            for tile in tiles:
                tiles_1.append(self.intern.normalize(self.intern.host(tile)))
                tiles_2.append(self._sam_input(tile))
            counts.append(t["tokens_per_tile"] * len(tiles))
        return (tiles_1, tiles_2), counts

    def _sam_input(self, tile: Image.Image) -> np.ndarray:
        """SAM's input for a tile: normalised, the bottom/right padding exactly 0 (as transformers)."""
        x = self.sam.normalize(self.sam.host(tile))
        height, width = self.sam.resized_size(tile.height, tile.width)
        x[height:], x[:, width:] = 0.0, 0.0
        return x

    @staticmethod
    def collate(visual: list) -> dict:
        """The rows' tiles as `LeoModel` inputs (NCHW); none without images."""
        first = [x for tiles, _ in visual for x in tiles]
        if not first:
            return {}
        second = [x for _, tiles in visual for x in tiles]
        nchw = lambda xs: torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return {"pixel_values": nchw(first), "pixel_values_sam": nchw(second),
                "image_flags": torch.ones(len(first), dtype=torch.long)}


class LeoMiniExpertInputs:
    """LEO-MINI ('leo_mini'): each image goes whole to every vision expert (config.json 'vision_experts', each with
    its preprocessor_config.json encoder entry) in a per-row image slot; CoTR gives num_queries tokens per image."""

    def __init__(self, pre_file: Path, pre: dict, config: dict, preprocessors: dict):
        self.num_queries = int(config["cotr"]["num_queries"])
        self.preprocessors = {}  # expert name -> its preprocessor
        for spec in config["vision_experts"]:
            keys = [k for k in (f"pixels_{spec['name']}", f"patches_{spec['name']}") if k in preprocessors]
            if not keys:
                raise ValueError(f"{pre_file}: no encoder entry for vision expert {spec['name']!r}")
            self.preprocessors[spec["name"]] = preprocessors[keys[0]]

    def image_inputs(self, loaded: list[Image.Image]) -> tuple[dict, list[int]]:
        """One row's images -> ({expert: [(input, patch mask or None) per image]}, visual tokens per image)."""
        per_expert = {}
        for name, pre in self.preprocessors.items():
            outs = [pre.host(image) for image in loaded]
            per_expert[name] = [(o["flattened_patches"], o["attention_mask"]) if isinstance(o, dict)
                                else (pre.normalize(o).transpose(2, 0, 1), None) for o in outs]
        return per_expert, [self.num_queries] * len(loaded)

    def collate(self, visual: list) -> dict:
        """The rows' images as `LeoMiniForCausalLM` inputs: [B, slots, ...] per expert, zero in empty slots marked
        by image_mask; none without images."""
        slots = max(len(next(iter(v.values()))) for v in visual) if visual else 0
        if slots == 0:
            return {}
        images, patch_masks = {}, {}
        image_mask = torch.zeros(len(visual), slots, dtype=torch.bool)
        for name in self.preprocessors:
            x, m = visual[0][name][0] if visual[0][name] else next(v[name][0] for v in visual if v[name])
            pixels = np.zeros((len(visual), slots, *x.shape), np.float32)
            masks = np.zeros((len(visual), slots, *m.shape), np.float32) if m is not None else None
            for r, row in enumerate(visual):
                for s, (xs, ms) in enumerate(row[name]):
                    pixels[r, s], image_mask[r, s] = xs, True
                    if masks is not None:
                        masks[r, s] = ms
            images[name] = torch.from_numpy(pixels)
            if masks is not None:
                patch_masks[name] = torch.from_numpy(masks)
        return {"images": images, "patch_masks": patch_masks, "image_mask": image_mask}


# preprocessor_config.json's model_kind -> the image inputs of that model
MODEL_KINDS = {"leo": LeoTileInputs, "leo_mini": LeoMiniExpertInputs}


class LeoProcessor:
    """Chats + images -> left-padded model inputs for the exported LEO ('leo') or LEO-MINI ('leo_mini'); `kind`
    (chosen from preprocessor_config.json's model_kind) makes the image inputs."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        config = read_json(path / "config.json", _NEEDED_FOR.format("the model config"), "re-export the model")
        tokenizer_config = read_json(path / "tokenizer_config.json",
                                     _NEEDED_FOR.format("the tokenizer settings and chat template"),
                                     "re-export the model")
        pre_file = path / "preprocessor_config.json"
        pre = read_json(pre_file, _NEEDED_FOR.format("the image preprocessing"), "re-export the model")
        kind = pre.get("model_kind")
        if kind not in MODEL_KINDS:
            raise ValueError(f"{pre_file}: model_kind={kind!r}; LeoProcessor serves "
                             f"{' and '.join(map(repr, MODEL_KINDS))} exports")
        self.template = tokenizer_config.get("leo_jax_template")
        if not self.template:
            raise ValueError(f"{path / 'tokenizer_config.json'} lacks 'leo_jax_template' (the training conversation "
                             "template): re-export the model with leo_jax")
        try:
            self.tokenizer = load_tokenizer(str(path))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"missing tokenizer: {e}") from e
        self.stop_ids = tuple(templates.stop_token_ids(self.tokenizer, self.template))
        self.pad_id = int(self.tokenizer.pad_id)
        preprocessors = {name: image_processing.from_settings(settings, f"{pre_file}: encoders.{name}")
                         for name, settings in (pre.get("encoders") or {}).items()}
        self.kind = MODEL_KINDS[kind](pre_file, pre, config, preprocessors)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LeoProcessor:
        return cls(path)

    def generation_kwargs(self, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0) -> dict:
        """`generate()` keyword arguments with this model's stop ids and pad id."""
        return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id)

    def batch_decode(self, tokens) -> list[str]:
        """Each row's answer text up to its first stop id (special tokens dropped)."""
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        return [templates.decode_answer(self.tokenizer, row, self.stop_ids) for row in rows]

    def __call__(self, conversations: Sequence[str | Sequence[dict]], images: Sequence[Sequence[Any]] | None = None
                 ) -> dict[str, Any]:
        """One conversation per row, ending with a user turn (a generation prompt follows it), and its images in
        `<image>` order (without placeholders, one per image is put first). -> input_ids, attention_mask,
        prompt_mask, answer_mask [B, T] (left-padded; answer_mask marks the history's answers, where LEO-MINI's
        exchanges end, as the training rows' loss mask) and the image inputs of the model kind."""
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        rows, visual = [], []
        for index, (conversation, sources) in enumerate(zip(conversations, images)):
            origin = f"conversation {index}: "
            loaded = [load_image(source, origin) for source in sources]
            turns = templates.ensure_image_placeholders(llava_turns(conversation), len(loaded))
            inputs, counts = self.kind.image_inputs(loaded)
            try:
                rows.append(templates.encode_conversation(turns, self.tokenizer, self.template, counts,
                                                          add_generation_prompt=True))
            except ValueError as e:
                raise ValueError(f"{origin}{e}") from e
            visual.append(inputs)
        length = max(len(row.input_ids) for row in rows)
        ids = np.full((len(rows), length), self.pad_id, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        prompt, answer = np.zeros((len(rows), length), bool), np.zeros((len(rows), length), bool)
        for r, row in enumerate(rows):
            n = len(row.input_ids)
            ids[r, length - n:], mask[r, length - n:] = row.input_ids, 1
            prompt[r, length - n:], answer[r, length - n:] = row.prompt_mask, row.loss_mask
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "prompt_mask": torch.from_numpy(prompt), "answer_mask": torch.from_numpy(answer)}
        return {**out, **self.kind.collate(visual)}
