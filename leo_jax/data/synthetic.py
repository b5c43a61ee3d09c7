"""Built-in synthetic visual-QA set: coloured shapes on a plain background, LLaVA JSON format.

    python -m leo_jax.data.synthetic --out DIR --num N [--seed S] [--val-num V] [--image-size PX]

writes DIR/images/{train,val}/NNNNNN.png, DIR/data.json (train), DIR/val.json, DIR/val.jsonl (the validation
questions in the benchmark format of `python -m leo_jax.eval`) and DIR/info.json (the arguments and the chance
level of every question type). Records follow LLaVA:
{"id", "image" (path relative to DIR, or a list of them), "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "red"}], "question_type", "scenes"}. `scenes` describes
every object of each image (shape, color, grid cell, centre, radius in pixels) so answers can be checked.

Evaluated question types (EVALUATED_TYPES: the one-image QUESTION_TYPES and the two-image 'multi_image') need the
image: the answer is drawn first, uniformly and balanced per type, the question's wording is drawn independently
of it, and the scene is built to make the answer true, so the text alone predicts nothing beyond chance. The
validation split holds the two-image questions (an equal share with each one-image type) when the training split
has them. A few training-only 'multi_turn' and 'text_only' samples exercise those paths of the pipeline;
training-only 'caption' samples ("Describe the image." -> every object's colour, shape and grid cell in reading
order) are the set's LLaVA-pretraining-style dense supervision.
Everything is a pure function of the seed: two runs write identical bytes.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND = (240, 240, 240)
GRID = 3  # objects sit in distinct cells of a GRID x GRID grid, so they never overlap
MIN_IMAGE_SIZE = 24

QUESTION_TYPES = ("color", "shape", "count", "position", "exists")  # evaluated one-image questions
MULTI_TURN = "multi_turn"  # training only: several questions about one image
MULTI_IMAGE = "multi_image"  # evaluated: which of two images has more objects
EVALUATED_TYPES = QUESTION_TYPES + (MULTI_IMAGE,)
TEXT_ONLY = "text_only"  # training only: no image
CAPTION = "caption"  # training only: every object of the image, in reading order
ANSWERS = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": NUMBER_WORDS[1:5],
    "position": ("left", "right"),
    "exists": ("yes", "no"),
    MULTI_IMAGE: ("first", "second"),
}
QUESTION_TEMPLATES = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many {shape}s are there?",
    "position": "Is the {color} {shape} left or right?",  # the object is in the left or the right column
    "exists": "Are there any {color} {shape}s?",
    "total": "How many objects are there?",  # multi-turn follow-up only
    "more": "Which image has more objects, the first or the second?",  # multi-image
    "sum": "What is {a} plus {b}?",  # text-only
    "caption": "Describe the image.",
}
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
IMAGE_PLACEHOLDER = "<image>"
ALL_PAIRS = tuple(itertools.product(SHAPES, COLORS))  # (shape, color)


# ------------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------------
def _random_pairs(rng, count, allowed):
    """`count` (shape, color) pairs drawn uniformly with replacement from those `allowed` accepts."""
    pool = [p for p in ALL_PAIRS if allowed(p)]
    return [pool[i] for i in rng.integers(0, len(pool), size=count)]


def _layout(rng, pairs, image_size, columns=None):
    """Places each (shape, color) in its own grid cell; columns[i], when given, fixes object i's column."""
    cell = image_size / GRID
    free = [(r, c) for r in range(GRID) for c in range(GRID)]
    cells = []
    for i in range(len(pairs)):
        options = [rc for rc in free if columns is None or i >= len(columns) or rc[1] == columns[i]]
        cells.append(options[rng.integers(0, len(options))])
        free.remove(cells[-1])
    objects = []
    for (shape, color), (row, col) in zip(pairs, cells):
        radius = int(cell * rng.uniform(0.26, 0.38))
        slack = max(0, int(cell / 2 - radius - 1))
        cx = int((col + 0.5) * cell) + int(rng.integers(-slack, slack + 1))
        cy = int((row + 0.5) * cell) + int(rng.integers(-slack, slack + 1))
        objects.append({"shape": shape, "color": color, "row": row, "col": col, "cx": cx, "cy": cy,
                        "radius": radius})
    return {"image_size": image_size, "objects": objects}


def render_scene(scene) -> Image.Image:
    """The RGB image of a scene description."""
    size = scene["image_size"]
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        cx, cy, r, fill = obj["cx"], obj["cy"], obj["radius"], COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def describe_scene(scene) -> str:
    """The caption of a scene: "<color> <shape> <grid cell>" of every object in reading order, comma-separated."""
    objects = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
    return ", ".join(f"{o['color']} {o['shape']} {CELL_NAMES[o['row'] * GRID + o['col']]}" for o in objects)


def answer_from_scene(scene, question_type: str, **params) -> str:
    """The correct answer to a question about `scene` (params as in QUESTION_TEMPLATES)."""
    objects = scene["objects"]

    def find(shape=None, color=None):
        return [o for o in objects if shape in (None, o["shape"]) and color in (None, o["color"])]

    if question_type == "color":
        (obj,) = find(shape=params["shape"])
        return obj["color"]
    if question_type == "shape":
        (obj,) = find(color=params["color"])
        return obj["shape"]
    if question_type == "count":
        return NUMBER_WORDS[len(find(shape=params["shape"]))]
    if question_type == "total":
        return NUMBER_WORDS[len(objects)]
    if question_type == CAPTION:
        return describe_scene(scene)
    if question_type == "exists":
        return "yes" if find(params["shape"], params["color"]) else "no"
    if question_type == "position":
        (obj,) = find(params["shape"], params["color"])
        if obj["col"] == GRID // 2:
            raise ValueError(f"position question about an object in the middle column: {params}")
        return "left" if obj["cx"] < scene["image_size"] / 2 else "right"
    raise ValueError(f"unknown question type {question_type!r}")


def _question_for_answer(rng, question_type, answer, image_size):
    """(scene, params) such that the question with `params` has `answer` on the scene.

    The params (the question's wording) are drawn independently of `answer`.
    """
    if question_type == "color":
        params = {"shape": SHAPES[rng.integers(len(SHAPES))]}
        pairs = [(params["shape"], answer)]
        pairs += _random_pairs(rng, rng.integers(0, 4), lambda p: p[0] != params["shape"])
        columns = None
    elif question_type == "shape":
        params = {"color": ANSWERS["color"][rng.integers(len(COLORS))]}
        pairs = [(answer, params["color"])]
        pairs += _random_pairs(rng, rng.integers(0, 4), lambda p: p[1] != params["color"])
        columns = None
    elif question_type == "count":
        params = {"shape": SHAPES[rng.integers(len(SHAPES))]}
        count = NUMBER_WORDS.index(answer)
        pairs = _random_pairs(rng, count, lambda p: p[0] == params["shape"])
        pairs += _random_pairs(rng, rng.integers(0, 3), lambda p: p[0] != params["shape"])
        columns = None
    elif question_type == "position":
        shape, color = ALL_PAIRS[rng.integers(len(ALL_PAIRS))]
        params = {"color": color, "shape": shape}
        columns = (0 if answer == "left" else GRID - 1,)
        pairs = [(shape, color)] + _random_pairs(rng, rng.integers(0, 4), lambda p: p != (shape, color))
    elif question_type == "exists":
        shape, color = ALL_PAIRS[rng.integers(len(ALL_PAIRS))]
        params = {"shape": shape, "color": color}
        num_objects = int(rng.integers(1, 5))
        pairs = [(shape, color)] if answer == "yes" else []
        pairs += _random_pairs(rng, num_objects - len(pairs), lambda p: p != (shape, color))
        columns = None
    else:
        raise ValueError(f"unknown question type {question_type!r}")
    order = rng.permutation(len(pairs)) if columns is None else np.arange(len(pairs))
    scene = _layout(rng, [pairs[i] for i in order], image_size, columns)
    if answer_from_scene(scene, question_type, **params) != answer:
        raise AssertionError(f"synthetic generator bug: {question_type} {params} -> {answer}")
    return scene, params


def _follow_up(rng, scene):
    """(question, answer) of one more evaluated-type question about `scene`, of a random type that the scene can
    answer (colour / shape need an object whose shape / colour is unique; position a unique object outside the middle
    column); exists asks about a present or an absent object with equal odds."""
    objects = scene["objects"]
    pairs = [(o["shape"], o["color"]) for o in objects]
    shape_counts = collections.Counter(shape for shape, _ in pairs)
    color_counts = collections.Counter(color for _, color in pairs)
    unique = [o for o in objects if pairs.count((o["shape"], o["color"])) == 1]
    sided = [o for o in unique if o["col"] != GRID // 2]
    for question_type in (QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))):
        if question_type == "color" and 1 in shape_counts.values():
            single = [s for s, n in sorted(shape_counts.items()) if n == 1]
            params = {"shape": single[rng.integers(len(single))]}
        elif question_type == "shape" and 1 in color_counts.values():
            single = [c for c, n in sorted(color_counts.items()) if n == 1]
            params = {"color": single[rng.integers(len(single))]}
        elif question_type == "count":
            present = sorted(shape_counts)
            params = {"shape": present[rng.integers(len(present))]}
        elif question_type == "position" and sided:
            obj = sided[rng.integers(len(sided))]
            params = {"shape": obj["shape"], "color": obj["color"]}
        elif question_type == "exists":
            absent = [p for p in ALL_PAIRS if p not in pairs]
            pool = pairs if rng.random() < 0.5 else absent
            shape, color = pool[rng.integers(len(pool))]
            params = {"shape": shape, "color": color}
        else:
            continue
        return QUESTION_TEMPLATES[question_type].format(**params), answer_from_scene(scene, question_type, **params)
    raise AssertionError("unreachable: a count question fits every scene")


def _turns(question, answer, num_images):
    return [{"from": "human", "value": (IMAGE_PLACEHOLDER + "\n") * num_images + question},
            {"from": "gpt", "value": answer}]


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
def _balanced_plan(rng, num):
    """`num` (question_type, answer) pairs, balanced over types and over each type's answers, shuffled."""
    plan = []
    for i in range(num):
        question_type = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        answers = ANSWERS[question_type]
        plan.append((question_type, answers[(i // len(QUESTION_TYPES)) % len(answers)]))
    return [plan[i] for i in rng.permutation(num)]


def _check_fractions(**fractions):
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise ValueError(f"{', '.join(fractions)} must be >= 0 and sum to < 1, got {fractions}")


def _random_scene(rng, image_size):
    """1 to 4 objects of any shape and color."""
    return _layout(rng, _random_pairs(rng, rng.integers(1, GRID * GRID // 2 + 1), lambda p: True), image_size)


def generate_records(num: int, seed: int, *, image_size: int = 64, split: str = "train",
                     multi_turn_fraction: float = 0.0, multi_image_fraction: float = 0.0,
                     text_only_fraction: float = 0.0, caption_fraction: float = 0.0,
                     follow_ups: int = 0) -> list[dict]:
    """LLaVA records; each with images has 'scenes', the scene of each of its images in order.

    `follow_ups` more questions (random answerable evaluated types, see _follow_up) are appended to every
    single-question record: more supervision per image encoded, which a model trained from scratch needs most.
    The record's question_type and the balance of answers are those of its first question.

    Deterministic in all arguments. Image paths are `images/{split}/{index:06d}.png` (multi-image
    samples: `..._{k}.png`).
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if follow_ups < 0:
        raise ValueError(f"follow_ups must be >= 0, got {follow_ups}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
    _check_fractions(multi_turn_fraction=multi_turn_fraction, multi_image_fraction=multi_image_fraction,
                    text_only_fraction=text_only_fraction, caption_fraction=caption_fraction)
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    extra = {MULTI_TURN: int(num * multi_turn_fraction), MULTI_IMAGE: int(num * multi_image_fraction),
             TEXT_ONLY: int(num * text_only_fraction)}
    if caption_fraction:  # (only when asked: sets written without captions keep their bytes)
        extra[CAPTION] = int(num * caption_fraction)
    kinds = _balanced_plan(rng, num - sum(extra.values()))
    for kind, count in extra.items():
        answers = ANSWERS.get(kind)  # two-image questions: balanced answers, as the one-image types
        kinds += [(kind, answers[i % len(answers)] if answers else None) for i in range(count)]
    kinds = [kinds[i] for i in rng.permutation(num)]

    records = []
    for index, (question_type, answer) in enumerate(kinds):
        record = {"id": f"synthetic-{split}-{index:06d}"}
        if question_type == TEXT_ONLY:
            a, b = (int(x) for x in rng.integers(0, 5, size=2))
            question = QUESTION_TEMPLATES["sum"].format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])
            record["conversations"] = _turns(question, NUMBER_WORDS[a + b], num_images=0)
        elif question_type == MULTI_IMAGE:
            scenes = [_random_scene(rng, image_size) for _ in range(2)]
            while len(scenes[0]["objects"]) == len(scenes[1]["objects"]):
                scenes[1] = _random_scene(rng, image_size)
            if (len(scenes[0]["objects"]) > len(scenes[1]["objects"])) != (answer == "first"):
                scenes.reverse()  # the drawn answer made true
            record["image"] = [f"images/{split}/{index:06d}_{k}.png" for k in range(2)]
            record["conversations"] = _turns(QUESTION_TEMPLATES["more"], answer, num_images=2)
            record["scenes"] = scenes
        elif question_type == CAPTION:
            scene = _random_scene(rng, image_size)
            record["image"] = f"images/{split}/{index:06d}.png"
            record["conversations"] = _turns(QUESTION_TEMPLATES[CAPTION], describe_scene(scene), num_images=1)
            record["scenes"] = [scene]
        else:
            if question_type == MULTI_TURN:
                first_type = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
                first_answer = ANSWERS[first_type][rng.integers(len(ANSWERS[first_type]))]
                scene, params = _question_for_answer(rng, first_type, first_answer, image_size)
                turns = _turns(QUESTION_TEMPLATES[first_type].format(**params), first_answer, num_images=1)
                shape, color = ALL_PAIRS[rng.integers(len(ALL_PAIRS))]
                extra_turns = [("total", {}), ("exists", {"shape": shape, "color": color})]
                for follow_type, follow_params in (extra_turns[i] for i in rng.permutation(2)):
                    turns += _turns(QUESTION_TEMPLATES[follow_type].format(**follow_params),
                                    answer_from_scene(scene, follow_type, **follow_params), num_images=0)
            else:
                scene, params = _question_for_answer(rng, question_type, answer, image_size)
                turns = _turns(QUESTION_TEMPLATES[question_type].format(**params), answer, num_images=1)
                for _ in range(follow_ups):
                    turns += _turns(*_follow_up(rng, scene), num_images=0)
            record["image"] = f"images/{split}/{index:06d}.png"
            record["conversations"] = turns
            record["scenes"] = [scene]
        record["question_type"] = question_type
        records.append(record)
    return records


def chance_levels(records) -> dict[str, dict]:
    """Per evaluated question type: sample count, answer-set size, majority answer and its accuracy
    (what always giving the most common answer scores), and uniform guessing accuracy (1/num_answers)."""
    answers = collections.defaultdict(list)
    for record in records:
        if record["question_type"] in ANSWERS:
            answers[record["question_type"]].append(record["conversations"][1]["value"])
    levels = {}
    for question_type in EVALUATED_TYPES:
        if not answers[question_type]:
            continue
        counts = collections.Counter(answers[question_type])
        majority, majority_count = max(sorted(counts.items()), key=lambda kv: kv[1])
        levels[question_type] = {
            "num": len(answers[question_type]),
            "num_answers": len(ANSWERS[question_type]),
            "majority_answer": majority,
            "majority_accuracy": majority_count / len(answers[question_type]),
            "uniform_accuracy": 1.0 / len(ANSWERS[question_type]),
        }
    return levels


def corpus_texts() -> list[str]:
    """Every question and answer text the generator can produce (the shipped tokenizer covers them)."""
    texts = [IMAGE_PLACEHOLDER + "\n"] + list(NUMBER_WORDS)
    for answers in ANSWERS.values():
        texts += answers
    for shape, color in ALL_PAIRS:
        texts += [QUESTION_TEMPLATES["color"].format(shape=shape), QUESTION_TEMPLATES["shape"].format(color=color),
                  QUESTION_TEMPLATES["count"].format(shape=shape),
                  QUESTION_TEMPLATES["exists"].format(shape=shape, color=color),
                  QUESTION_TEMPLATES["position"].format(shape=shape, color=color)]
    texts += [QUESTION_TEMPLATES["total"], QUESTION_TEMPLATES["more"], "first", "second"]
    texts += [QUESTION_TEMPLATES[CAPTION], ", ".join(CELL_NAMES)]
    texts += [QUESTION_TEMPLATES["sum"].format(a=a, b=b) for a in NUMBER_WORDS for b in NUMBER_WORDS]
    return list(dict.fromkeys(texts))


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic(path: str):
    """Yields a temporary path next to `path`, renamed onto it once the block completes: a killed writer never
    leaves a partial file under the final name (the set is regenerated when data.json / val.json are missing)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, value):
    with _atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def benchmark_record(record: dict) -> dict:
    """A record's first question in the benchmark format of `python -m leo_jax.eval`: id, question (without the
    image placeholder), image, answers, question_type."""
    question, answer = (turn["value"] for turn in record["conversations"][:2])
    return {"id": record["id"], "question": question.replace(IMAGE_PLACEHOLDER + "\n", ""), "image": record["image"],
            "answers": [answer], "question_type": record["question_type"]}


def write_benchmark_file(out_dir: str, val_records: list[dict]) -> str:
    """out_dir/val.jsonl: the validation questions as `python -m leo_jax.eval` reads them."""
    path = os.path.join(out_dir, "val.jsonl")
    with _atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(benchmark_record(record)) + "\n" for record in val_records)
    return path


def write_split(out_dir: str, split: str, num: int, seed: int, **options) -> list[dict]:
    """Generates one split, writes its PNGs under out_dir/images/split/, returns its records."""
    records = generate_records(num, seed, split=split, **options)
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    for record in records:
        paths = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        for path, scene in zip(paths, record.get("scenes", [])):
            with _atomic(os.path.join(out_dir, path)) as tmp:
                render_scene(scene).save(tmp, format="PNG")
    return records


def write_dataset(out_dir: str, num: int, seed: int = 0, *, val_num: int = 500, image_size: int = 64,
                  multi_turn_fraction: float = 0.05, multi_image_fraction: float = 0.02,
                  text_only_fraction: float = 0.05, caption_fraction: float = 0.0, follow_ups: int = 0) -> dict:
    """Writes data.json (train: evaluated types + multi-turn, text-only and caption samples), val.json (evaluated
    types only; the two-image type, an equal share, only when the training split has it) with their images,
    val.jsonl (val.json as benchmark records) and info.json (arguments, chance levels); returns the info dict."""
    os.makedirs(out_dir, exist_ok=True)
    train = write_split(out_dir, "train", num, seed, image_size=image_size, multi_turn_fraction=multi_turn_fraction,
                        multi_image_fraction=multi_image_fraction, text_only_fraction=text_only_fraction,
                        caption_fraction=caption_fraction, follow_ups=follow_ups)
    val = write_split(out_dir, "val", val_num, seed, image_size=image_size,
                      multi_image_fraction=1 / len(EVALUATED_TYPES) if multi_image_fraction > 0 else 0.0)
    _write_json(os.path.join(out_dir, "data.json"), train)
    _write_json(os.path.join(out_dir, "val.json"), val)
    write_benchmark_file(out_dir, val)
    info = {
        "num": num, "val_num": val_num, "seed": seed, "image_size": image_size,
        "multi_turn_fraction": multi_turn_fraction, "multi_image_fraction": multi_image_fraction,
        "text_only_fraction": text_only_fraction, "caption_fraction": caption_fraction, "follow_ups": follow_ups,
        "question_types": list(EVALUATED_TYPES), "answers": ANSWERS,
        "chance_train": chance_levels(train), "chance_val": chance_levels(val),
    }
    _write_json(os.path.join(out_dir, "info.json"), info)
    return info


def format_chance_table(levels: dict[str, dict]) -> str:
    lines = [f"{'type':<10} {'n':>6} {'answers':>7} {'majority':>9} {'1/answers':>9}"]
    for question_type, level in levels.items():
        lines.append(f"{question_type:<10} {level['num']:>6d} {level['num_answers']:>7d} "
                     f"{level['majority_accuracy']:>9.3f} {level['uniform_accuracy']:>9.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leo_jax.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--num", type=int, required=True, help="number of training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-num", type=int, default=500, help="number of validation samples (default 500)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--multi-turn-fraction", type=float, default=0.05)
    parser.add_argument("--multi-image-fraction", type=float, default=0.02)
    parser.add_argument("--text-only-fraction", type=float, default=0.05)
    parser.add_argument("--caption-fraction", type=float, default=0.0,
                        help="fraction of training samples that describe the whole image (dense supervision)")
    parser.add_argument("--follow-ups", type=int, default=0,
                        help="extra questions about the same image in each single-question training sample")
    args = parser.parse_args(argv)
    if args.val_num < 1:
        parser.error(f"--val-num must be >= 1, got {args.val_num}")
    try:
        info = write_dataset(args.out, args.num, args.seed, val_num=args.val_num, image_size=args.image_size,
                             multi_turn_fraction=args.multi_turn_fraction,
                             multi_image_fraction=args.multi_image_fraction,
                             text_only_fraction=args.text_only_fraction,
                             caption_fraction=args.caption_fraction, follow_ups=args.follow_ups)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.num} training samples to {os.path.join(args.out, 'data.json')} and "
          f"{args.val_num} validation samples to {os.path.join(args.out, 'val.json')} (benchmark format for "
          f"`python -m leo_jax.eval`: {os.path.join(args.out, 'val.jsonl')})")
    print("chance level per question type (validation set):")
    print(format_chance_table(info["chance_val"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
