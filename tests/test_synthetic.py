"""Synthetic visual-QA set: deterministic, balanced, answers need the image and are correct."""
import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from leo_jax import scoring
from leo_jax.data import synthetic

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def solve(question, scenes):
    """Answers a question from the scene descriptions; written independently of the generator."""
    objects = scenes[0]["objects"] if scenes else []

    def matching(shape=None, color=None):
        return [o for o in objects if (shape is None or o["shape"] == shape) and (color is None or o["color"] == color)]

    question = question.replace("<image>\n", "")
    if question == "Which image has more objects, the first or the second?":
        first, second = (len(scene["objects"]) for scene in scenes)
        assert first != second
        return "first" if first > second else "second"
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (obj,) = matching(shape=m[1])
        return obj["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj,) = matching(color=m[1])
        return obj["shape"]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return WORDS[len(objects) if m[1] == "object" else len(matching(shape=m[1]))]
    if m := re.fullmatch(r"Is the (\w+) (\w+) left or right\?", question):
        (obj,) = matching(m[2], m[1])
        size = scenes[0]["image_size"]
        assert abs(obj["cx"] - size / 2) > size / 6  # clearly on one side: not in the middle third
        return "left" if obj["cx"] < size / 2 else "right"
    if m := re.fullmatch(r"Are there any (\w+) (\w+)s\?", question):
        return "yes" if matching(m[2], m[1]) else "no"
    if m := re.fullmatch(r"What is (\w+) plus (\w+)\?", question):
        return WORDS[WORDS.index(m[1]) + WORDS.index(m[2])]
    if question == "Describe the image.":
        rows, cols = ("top", "", "bottom"), ("left", "", "right")
        size = scenes[0]["image_size"]
        cells = [(o["cy"] * 3 // size, o["cx"] * 3 // size, o) for o in objects]  # grid cell from the centre
        described = []
        for row, col, o in sorted(cells, key=lambda c: c[:2]):  # reading order
            cell = " ".join(w for w in (rows[row], cols[col]) if w) or "center"
            described.append(f"{o['color']} {o['shape']} {cell}")
        return ", ".join(described)
    raise AssertionError(f"unparsed question {question!r}")


@pytest.fixture(scope="module")
def train_records():
    return synthetic.generate_records(3000, seed=7, multi_turn_fraction=0.05, multi_image_fraction=0.02,
                                      text_only_fraction=0.05)


@pytest.fixture(scope="module")
def val_records():
    return synthetic.generate_records(1000, seed=7, split="val")


def test_answers_are_correct_for_the_scene(train_records):
    seen_types = collections.Counter()
    for record in train_records:
        turns = record["conversations"]
        seen_types[record["question_type"]] += 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        for question, answer in zip(turns[0::2], turns[1::2]):
            assert solve(question["value"], record.get("scenes")) == answer["value"], record["id"]
            assert re.fullmatch(r"[a-z]+", answer["value"])  # one short word
        images = sum(t["value"].count("<image>") for t in turns)
        expected_images = {"text_only": 0, "multi_image": 2}.get(record["question_type"], 1)
        assert images == expected_images == len(record.get("scenes", []))
        paths = record.get("image", [])
        assert len([paths] if isinstance(paths, str) else paths) == images
        assert turns[0]["value"].startswith("<image>\n" * images)
    assert seen_types["multi_turn"] == 150 and seen_types["text_only"] == 150 and seen_types["multi_image"] == 60
    assert all(seen_types[t] >= 500 for t in synthetic.QUESTION_TYPES)


def test_objects_do_not_overlap_and_stay_inside(train_records):
    for scene in (scene for record in train_records[:500] for scene in record.get("scenes", [])):
        cells = [(o["row"], o["col"]) for o in scene["objects"]]
        assert len(cells) == len(set(cells))
        for o in scene["objects"]:
            assert 0 <= o["cx"] - o["radius"] and o["cx"] + o["radius"] < 64
            assert 0 <= o["cy"] - o["radius"] and o["cy"] + o["radius"] < 64


def test_answers_are_balanced_per_type(train_records, val_records):
    for records in (train_records, val_records):
        one_image = [r for r in records if r["question_type"] in synthetic.QUESTION_TYPES]
        per_type = collections.Counter(r["question_type"] for r in one_image)
        assert max(per_type.values()) - min(per_type.values()) <= 1
        for question_type, answers in synthetic.ANSWERS.items():
            counts = collections.Counter(r["conversations"][-1]["value"] for r in records
                                         if r["question_type"] == question_type)
            if question_type == synthetic.MULTI_IMAGE and records is val_records:
                assert not counts  # the split was generated without two-image questions
                continue
            assert set(counts) == set(answers)
            assert max(counts.values()) - min(counts.values()) <= 1, (question_type, counts)
    assert {r["question_type"] for r in val_records} == set(synthetic.QUESTION_TYPES)  # val: evaluated types only


def test_two_image_questions_are_an_evaluated_share_of_validation(tmp_path):
    """With two-image questions in training, the validation set holds them as a sixth type, answers balanced (the
    majority baseline is 0.5), in the benchmark file and the chance table; without them it holds none."""
    info = synthetic.write_dataset(str(tmp_path / "with"), 12, 0, val_num=60, image_size=32,
                                   multi_image_fraction=0.25)
    val = json.loads((tmp_path / "with" / "val.json").read_text())
    two = [r for r in val if r["question_type"] == synthetic.MULTI_IMAGE]
    assert len(two) == 10 and {r["question_type"] for r in val} == set(synthetic.EVALUATED_TYPES)
    assert collections.Counter(r["conversations"][1]["value"] for r in two) == {"first": 5, "second": 5}
    for record in two:
        assert len(record["image"]) == 2 and solve(record["conversations"][0]["value"], record["scenes"]) == \
            record["conversations"][1]["value"]
    assert info["chance_val"][synthetic.MULTI_IMAGE]["majority_accuracy"] == 0.5
    benchmark = [json.loads(line) for line in (tmp_path / "with" / "val.jsonl").read_text().splitlines()]
    assert sum(r["question_type"] == synthetic.MULTI_IMAGE for r in benchmark) == 10
    info = synthetic.write_dataset(str(tmp_path / "without"), 12, 0, val_num=12, image_size=32,
                                   multi_image_fraction=0.0)
    assert set(info["chance_val"]) == set(synthetic.QUESTION_TYPES)


def text_only_baseline_accuracy(train, val):
    """Per type: accuracy on `val` of answering each question text with its majority answer in `train`."""
    by_text = collections.defaultdict(collections.Counter)
    for record in train:
        by_text[record["conversations"][0]["value"]][record["conversations"][-1]["value"]] += 1
    correct, total = collections.Counter(), collections.Counter()
    for record in val:
        answers = by_text.get(record["conversations"][0]["value"])
        guess = max(sorted(answers.items()), key=lambda kv: kv[1])[0] if answers else None
        correct[record["question_type"]] += guess == record["conversations"][-1]["value"]
        total[record["question_type"]] += 1
    return {t: correct[t] / total[t] for t in total}


def test_text_alone_does_not_beat_chance(train_records, val_records):
    train = [r for r in train_records if r["question_type"] in synthetic.QUESTION_TYPES]
    accuracy = text_only_baseline_accuracy(train, val_records)
    chance = synthetic.chance_levels(val_records)
    for question_type in synthetic.QUESTION_TYPES:
        # ~200 val questions per type: 0.08 is >= 2.3 binomial standard deviations (fixed seeds: not flaky).
        assert accuracy[question_type] <= chance[question_type]["uniform_accuracy"] + 0.08, (question_type, accuracy)

    # The same baseline does detect a leak: make the answer a function of the question text.
    def with_leaked_answer(record):
        question = record["conversations"][0]
        return dict(record, conversations=[question, {"from": "gpt", "value": str(len(question["value"]) % 3)}])

    leaky = [with_leaked_answer(r) for r in train + val_records]
    assert min(text_only_baseline_accuracy(leaky[:len(train)], leaky[len(train):]).values()) > 0.75  # chance: 1/3


def test_chance_levels_of_a_balanced_set(val_records):
    levels = synthetic.chance_levels(val_records)
    assert set(levels) == set(synthetic.QUESTION_TYPES)
    for question_type, level in levels.items():
        assert level["num"] == 200 and level["num_answers"] == len(synthetic.ANSWERS[question_type])
        assert level["uniform_accuracy"] == pytest.approx(1 / level["num_answers"])
        assert level["majority_accuracy"] == pytest.approx(np.ceil(200 / level["num_answers"]) / 200)


def test_deterministic_bytes_and_seed_dependence(tmp_path):
    first, second, other = (tmp_path / n for n in ("a", "b", "c"))
    synthetic.write_dataset(str(first), 40, seed=3, val_num=10)
    synthetic.write_dataset(str(second), 40, seed=3, val_num=10)
    synthetic.write_dataset(str(other), 40, seed=4, val_num=10)

    def contents(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(root) for f in files}

    assert contents(first) == contents(second)
    assert contents(first)["data.json"] != contents(other)["data.json"]


def test_cli_writes_expected_files(tmp_path):
    out = tmp_path / "synth"
    result = subprocess.run(
        [sys.executable, "-m", "leo_jax.data.synthetic", "--out", str(out), "--num", "30", "--seed", "1",
         "--val-num", "12", "--image-size", "48", "--multi-image-fraction", "0.1"],
        capture_output=True, text=True, check=True)
    for question_type in synthetic.QUESTION_TYPES:
        assert re.search(rf"^{question_type}\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+$", result.stdout, re.M)
    train = json.loads((out / "data.json").read_text())
    val = json.loads((out / "val.json").read_text())
    info = json.loads((out / "info.json").read_text())
    assert len(train) == 30 and len(val) == 12 and info["image_size"] == 48
    assert info["chance_val"] == synthetic.chance_levels(val)
    for record in train + val:
        assert set(record) >= {"id", "conversations", "question_type"}
        paths = record.get("image", [])
        for path, scene in zip([paths] if isinstance(paths, str) else paths, record.get("scenes", [])):
            image = Image.open(out / path)
            assert image.size == (48, 48) and image.mode == "RGB"
            pixels = np.asarray(image)
            for obj in scene["objects"]:  # each object is drawn in its colour at its centre
                y = obj["cy"] + (obj["radius"] // 3 if obj["shape"] == "triangle" else 0)
                assert tuple(pixels[y, obj["cx"]]) == synthetic.COLORS[obj["color"]]
    num_images = sum(len(r.get("scenes", [])) for r in train)
    assert len(list((out / "images" / "train").iterdir())) == num_images


@pytest.mark.parametrize("args,message", [
    (["--num", "0"], "num must be >= 1"),
    (["--num", "5", "--image-size", "8"], "image_size must be >= 24"),
    (["--num", "5", "--val-num", "0"], "--val-num must be >= 1"),
    (["--num", "5", "--text-only-fraction", "0.7", "--multi-turn-fraction", "0.5"], "sum to < 1"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path / "x")] + args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_per_type_accuracy(val_records):
    truth = [r["conversations"][-1]["value"] for r in val_records]
    perfect = scoring.per_type_accuracy(val_records, [" " + a.capitalize() + "." for a in truth])
    assert all(v["accuracy"] == 1.0 for v in perfect.values())
    always_yes = scoring.per_type_accuracy(val_records, ["yes"] * len(val_records))
    assert always_yes["exists"]["accuracy"] == 0.5 and always_yes["color"]["accuracy"] == 0.0
    assert always_yes["exists"]["uniform_accuracy"] == 0.5
    with pytest.raises(ValueError, match="got 1 predictions for 1000 records"):
        scoring.per_type_accuracy(val_records, ["yes"])


def test_trainer_validation_scores_with_the_benchmark_normaliser(val_records):
    from leo_jax.train.evaluate import answer_metrics

    records = val_records[:50]
    truth = [r["conversations"][1]["value"] for r in records]
    predictions = ["The " + t.capitalize() + "." for t in truth]  # article, case and period are normalised away
    predictions[0] = truth[0] + " " + truth[0]  # a second word makes another answer
    metrics = answer_metrics(list(range(50)), predictions, truth, records)
    assert metrics["eval/num"] == 50 and metrics["eval/exact_match"] == 49 / 50
    per_type = scoring.per_type_accuracy(records, predictions)
    assert {k: v for k, v in metrics.items() if k.endswith("/accuracy") and "majority" not in k} == \
        {f"eval/{t}/accuracy": v["accuracy"] for t, v in per_type.items()}
    assert [t for t, v in per_type.items() if v["accuracy"] < 1] == [records[0]["question_type"]]
    assert answer_metrics([0, 1], predictions[:2], truth[:2], None) == {"eval/num": 2.0, "eval/exact_match": 0.5}


def test_follow_up_questions_are_answerable_and_correct():
    """follow_ups=3: every single-question record asks 3 more questions about its image, of every evaluated type,
    all correct for the scene (independent solver); the first questions stay balanced per type."""
    records = synthetic.generate_records(600, seed=3, follow_ups=3, multi_turn_fraction=0.05)
    follow_up_types, exists_answers = collections.Counter(), collections.Counter()
    for record in records:
        turns = record["conversations"]
        if record["question_type"] in synthetic.QUESTION_TYPES:
            assert len(turns) == 2 * 4 and turns[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in turns[1:])
            for question in turns[2::2]:
                kind = next(k for k in synthetic.QUESTION_TYPES
                            if re.fullmatch(re.sub(r"\\{\w+\\}", r"\\w+", re.escape(synthetic.QUESTION_TEMPLATES[k])),
                                            question["value"]))
                follow_up_types[kind] += 1
        for question, answer in zip(turns[0::2], turns[1::2]):
            assert solve(question["value"], record.get("scenes")) == answer["value"], record["id"]
            if question["value"].startswith("Are there any"):
                exists_answers[answer["value"]] += 1
    assert set(follow_up_types) == set(synthetic.QUESTION_TYPES)
    assert 0.35 < exists_answers["yes"] / sum(exists_answers.values()) < 0.65
    levels = synthetic.chance_levels(records)
    assert all(abs(level["majority_accuracy"] - level["uniform_accuracy"]) < 0.05 for level in levels.values())
    with pytest.raises(ValueError, match="follow_ups must be >= 0"):
        synthetic.generate_records(10, seed=0, follow_ups=-1)


def test_caption_samples_describe_every_object_in_reading_order():
    """caption_fraction: that share of training samples asks for a description; the caption (independent solver)
    names each object's colour, shape and grid cell; without the option the set's bytes do not change."""
    records = synthetic.generate_records(400, seed=5, caption_fraction=0.25, multi_turn_fraction=0.05)
    captions = [r for r in records if r["question_type"] == synthetic.CAPTION]
    assert len(captions) == 100
    for record in records:
        for question, answer in zip(record["conversations"][0::2], record["conversations"][1::2]):
            assert solve(question["value"], record.get("scenes")) == answer["value"], record["id"]
    assert {len(r["scenes"][0]["objects"]) for r in captions} == {1, 2, 3, 4}
    assert synthetic.describe_scene({"image_size": 60, "objects": [
        {"shape": "square", "color": "red", "row": 2, "col": 2, "cx": 50, "cy": 50},
        {"shape": "circle", "color": "blue", "row": 0, "col": 1, "cx": 30, "cy": 8}]}) == \
        "blue circle top, red square bottom right"
    assert synthetic.generate_records(50, seed=5) == synthetic.generate_records(50, seed=5, caption_fraction=0.0)
    with pytest.raises(ValueError, match="caption_fraction must be >= 0"):
        synthetic.generate_records(10, seed=0, caption_fraction=-0.1)


def test_training_default_points_at_the_set_and_restores_its_benchmark_file(tmp_path):
    """ensure_synthetic_data writes the set once, points data.* at it, and re-creates val.jsonl for a set written
    before that file existed (identical to what write_dataset writes)."""
    import ml_collections

    from leo_jax.train.synthetic_data import ensure_synthetic_data

    config = ml_collections.ConfigDict({"data": {"train_files": "", "eval_files": ""}, "synthetic": {
        "num": 12, "val_num": 6, "seed": 0, "image_size": 32, "multi_image_fraction": 0.0, "caption_fraction": 0.25,
        "follow_ups": 2, "dir": ""}})
    ensure_synthetic_data(config, str(tmp_path))
    out = tmp_path / "synthetic"
    assert config.data.train_files == str(out / "data.json") and config.data.eval_files == str(out / "val.json")
    train = json.load(open(out / "data.json"))
    assert all(len(r["conversations"]) in (2 * 3, 2) for r in train)  # follow_ups=2
    assert sum(r["question_type"] == "caption" for r in train) == 3
    written = (out / "val.jsonl").read_text()
    assert len(written.splitlines()) == 6
    (out / "val.jsonl").unlink()
    ensure_synthetic_data(config, str(tmp_path))
    assert (out / "val.jsonl").read_text() == written
