"""Grain pipeline: batch contract for LEO and LEO-MINI, exact resume (0 and 2 workers), worker-independent
order, bad-input skipping with counts and the fraction limit, process sharding and global batch assembly."""
import json
import logging

import grain
import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import PartitionSpec as P
from PIL import Image

from leo_jax.configs import common_data
from leo_jax.data import image_processing, pipeline, templates, tiling, visual
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH

TILE, SAM, TOKENS_PER_TILE = 28, 32, 4


def _turns(question, answer, tags=1):
    return [{"from": "human", "value": "<image>\n" * tags + question}, {"from": "gpt", "value": answer}]


def _write_images(root, rng, names_sizes):
    for name, (width, height) in names_sizes:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / name)


def _good_records(root, rng, count, prefix):
    """Single-image (varied aspect ratios), two-image and text-only samples (i % 4: 0, 1 -> one image,
    2 -> two images, 3 -> text only) with short answers."""
    records = []
    for i in range(count):
        kind = i % 4
        question = "what color is the circle ?" + " and the square ?" * int(rng.integers(0, 3))
        answer = " ".join(["red"] * int(rng.integers(1, 6)))
        if kind == 3:
            records.append({"id": f"t{i}", "conversations": [{"from": "human", "value": question},
                                                            {"from": "gpt", "value": answer}]})
            continue
        names = [f"{prefix}{i}_{j}.png" for j in range(1 + (kind == 2))]
        _write_images(root, rng, [(n, (int(rng.integers(16, 100)), int(rng.integers(16, 60)))) for n in names])
        records.append({"id": f"s{i}", "image": names[0] if len(names) == 1 else names,
                        "conversations": _turns(question, answer, tags=len(names))})
    return records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """tmp/good.jsonl (valid only), tmp/mixed.jsonl (valid + one of each bad kind), images under tmp/images."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    good = _good_records(root, rng, 24, "good")
    with open(root / "good.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in good)

    _write_images(root, rng, [("wide_a.png", (90, 30)), ("wide_b.png", (90, 30))])
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    bad = {
        "missing_image": {"image": "nope.png", "conversations": _turns("what ?", "red")},
        "corrupt_image": {"image": "corrupt.png", "conversations": _turns("what ?", "red")},
        "image_tag_mismatch": {"image": "good0_0.png", "conversations": _turns("what ?", "red", tags=2)},
        "too_long": {"image": "good0_0.png", "conversations": _turns("what ?", " ".join(["red blue"] * 200))},
        # 2 wide images: budget 3 tiles each (3x1 grid) + thumbnail = 8 tiles > 7 slots per row.
        "too_many_images": {"image": ["wide_a.png", "wide_b.png"], "conversations": _turns("what ?", "red", tags=2)},
        "malformed_record": {"conversations": []},
    }
    mixed_lines = [json.dumps(r) for r in _good_records(root, rng, 16, "mixed")]
    for offset, (reason, record) in enumerate(bad.items()):
        mixed_lines.insert(2 + 3 * offset, json.dumps(dict(record, id=reason)))
    mixed_lines.insert(5, '{"id": "malformed_json", "conversations": [')
    with open(root / "mixed.jsonl", "w") as f:
        f.writelines(line + "\n" for line in mixed_lines)
    return root


def _config(data_dir, files="good.jsonl", **overrides):
    c = common_data.get_config()
    c.train_files = str(data_dir / files)
    c.image_root = str(data_dir / "images")
    c.eval_image_root = str(data_dir / "images")
    c.tokenizer = SYNTHETIC_TOKENIZER_PATH
    c.template = "internlm2_chat"
    c.seq_len = 128
    c.global_batch_size = 4
    c.eval_batch_size = 4
    c.leo.sam_size = SAM
    c.leo.max_tiles_per_row = 7
    c.leo_mini.max_images_per_row = 2
    c.read_threads = 1
    c.read_buffer_size = 4
    c.worker_buffer_size = 2
    for key, value in overrides.items():
        target = c
        *path, leaf = key.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value
    return c


EXPERTS = {"clip": {"kind": "clip", "shortest_edge": 20, "crop_size": 20},
           "pix2struct": {"kind": "pix2struct", "max_patches": 16, "patch_size": 4}}


def _kind(config, name):
    """The data-side kind with this test's model facts (TILE px tiles of TOKENS_PER_TILE tokens; two experts and
    3 tokens per image) and the data config's options."""
    if name == "leo":
        return visual.LeoTiles.from_data(config, TILE, TOKENS_PER_TILE)
    return visual.LeoMiniExperts.from_data(config, EXPERTS, 3)


def _iterator(which, config, name="leo", process_index=0, process_count=1):
    make = pipeline.make_train_iterator if which == "train" else pipeline.make_eval_iterator
    return make(config, _kind(config, name), process_index=process_index, process_count=process_count)


def _all_batches(iterator):
    batches = list(iterator)
    iterator.close()
    return batches


def _context_id():
    return templates.setup_tokenizer(SYNTHETIC_TOKENIZER_PATH, "internlm2_chat").token_to_id(templates.IMG_CONTEXT)


def test_leo_eval_batches_follow_the_contract(data_dir):
    config = _config(data_dir)
    batches = _all_batches(_iterator("eval", config))
    assert len(batches) == 6  # 24 records / 4 rows
    context_id = _context_id()
    expected = {
        "input_ids": ((4, 128), np.int32), "labels": ((4, 128), np.int32), "loss_mask": ((4, 128), np.float32),
        "segment_ids": ((4, 128), np.int32), "positions": ((4, 128), np.int32), "prompt_mask": ((4, 128), np.bool_),
        "sample_index": ((4, 1), np.int64), "tile_mask": ((4, 7), np.bool_), "tile_segment_ids": ((4, 7), np.int32),
        "tiles": ((4, 7, TILE, TILE, 3), np.uint8), "sam_tiles": ((4, 7, SAM, SAM, 3), np.uint8),
    }
    for batch in batches:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
        # Visual tokens in each row == tokens_per_tile x valid tiles; tiles fill the first slots.
        np.testing.assert_array_equal(
            (batch["input_ids"] == context_id).sum(1), TOKENS_PER_TILE * batch["tile_mask"].sum(1))
        assert (np.sort(batch["tile_mask"], axis=1)[:, ::-1] == batch["tile_mask"]).all()
        assert batch["loss_mask"].sum(1).min() > 0
    # One pass over the file, in order (no shuffle), unpacked.
    assert np.concatenate([b["sample_index"][:, 0] for b in batches]).tolist() == list(range(24))

    # The first record's tiles are exactly LEO tiling + per-encoder host preprocessing, no JPEG augmentation.
    record = json.loads((data_dir / "good.jsonl").read_text().splitlines()[0])
    image = Image.open(data_dir / "images" / record["image"]).convert("RGB")
    tiles = tiling.tile_image(image, max_tiles=6, tile=TILE)
    sam = image_processing.get_preprocessor("sam", longest_edge=SAM)
    np.testing.assert_array_equal(batches[0]["tiles"][0, : len(tiles)], np.stack([np.asarray(t) for t in tiles]))
    np.testing.assert_array_equal(batches[0]["sam_tiles"][0, : len(tiles)], np.stack([sam.host(t) for t in tiles]))
    assert batches[0]["tile_mask"][0].sum() == len(tiles)


def test_leo_mini_batches_and_text_only_rows(data_dir):
    config = _config(data_dir, packing=True, max_samples_per_row=3, num_epochs=1, shuffle=False)
    batches = _all_batches(_iterator("train", config, "leo_mini"))
    context_id = _context_id()
    for batch in batches:
        assert batch["pixels_clip"].shape == (4, 2, 20, 20, 3) and batch["pixels_clip"].dtype == np.uint8
        assert batch["patches_pix2struct"].shape == (4, 2, 16, 2 + 3 * 4 * 4)
        assert batch["patch_mask_pix2struct"].shape == (4, 2, 16) and batch["image_mask"].shape == (4, 2)
        np.testing.assert_array_equal((batch["input_ids"] == context_id).sum(1), 3 * batch["image_mask"].sum(1))
        # Image slots without an image hold zeros (text-only samples keep the same shapes).
        assert (batch["pixels_clip"][~batch["image_mask"]] == 0).all()
        assert (batch["patch_mask_pix2struct"][batch["image_mask"]].sum(-1) > 0).all()
    indices = np.concatenate([b["sample_index"].ravel() for b in batches])
    assert sorted(indices[indices >= 0].tolist()) == list(range(24))
    # 6 + 6 one-image, 6 two-image and 6 text-only records: 24 images in all, each in one slot.
    assert sum(int(b["image_mask"].sum()) for b in batches) == 24


def test_jpeg_augmentation_only_on_internvit_tiles_in_training(data_dir):
    config = _config(data_dir, shuffle=False, num_epochs=1)
    train = _all_batches(_iterator("train", config))
    evaluation = _all_batches(_iterator("eval", config))
    assert len(train) == len(evaluation)
    for a, b in zip(train, evaluation):
        for key in ("input_ids", "labels", "loss_mask", "sam_tiles", "tile_mask", "sample_index"):
            np.testing.assert_array_equal(a[key], b[key])
    diffs = [np.abs(a["tiles"].astype(int) - b["tiles"].astype(int)).max() for a, b in zip(train, evaluation)]
    assert max(diffs) > 0  # JPEG re-encoding changed the InternViT tiles
    no_aug = _config(data_dir, shuffle=False, num_epochs=1, **{"leo.jpeg_augment": False})
    plain = _all_batches(_iterator("train", no_aug))
    for a, b in zip(plain, evaluation):
        np.testing.assert_array_equal(a["tiles"], b["tiles"])


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def reference_run(data_dir):
    """8 packed, shuffled, augmented batches of the mixed (partly bad) data with 0 workers, crossing epochs."""
    config = _config(data_dir, "mixed.jsonl", packing=True, max_samples_per_row=3, num_epochs=None,
                     max_skip_fraction=1.0, seed=7)
    iterator = _iterator("train", config)
    batches = _take(iterator, 8)
    stats = iterator.skip_stats.as_metrics()
    iterator.close()
    return config, batches, stats


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_and_worker_independent_order(reference_run, num_workers, tmp_path):
    config, reference, reference_stats = reference_run
    config = _config_copy(config, num_workers=num_workers)
    first = _iterator("train", config)
    head = _take(first, 3)
    # Saved and restored as the trainer does: Grain's Orbax handler writes get_state() as JSON per process.
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=first)
    first.close()
    resumed = _iterator("train", config)
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=resumed)
    tail = _take(resumed, 5)
    stats = resumed.skip_stats.as_metrics()
    resumed.close()
    # Same batches as the uninterrupted 0-worker run: resume is exact and the order ignores the worker count.
    _assert_same_batches(head + tail, reference)
    assert stats == reference_stats and stats["data/records_skipped"] > 0


def _config_copy(config, **overrides):
    copy = config.copy_and_resolve_references()
    for key, value in overrides.items():
        copy[key] = value
    return copy


def test_seed_fixes_order(reference_run):
    config, reference, _ = reference_run
    again = _iterator("train", config)
    _assert_same_batches(_take(again, 2), reference[:2])
    again.close()
    other = _iterator("train", _config_copy(config, seed=8))
    assert next(other)["sample_index"].tolist() != reference[0]["sample_index"].tolist()
    other.close()


def test_bad_input_is_skipped_counted_and_logged(data_dir, caplog):
    config = _config(data_dir, "mixed.jsonl", max_skip_fraction=1.0)
    caplog.set_level(logging.WARNING, logger=pipeline.logger.name)
    iterator = _iterator("eval", config)
    batches = list(iterator)
    metrics = iterator.skip_stats.as_metrics()
    iterator.close()
    reasons = ["missing_image", "corrupt_image", "image_tag_mismatch", "too_long", "too_many_images",
               "malformed_record", "malformed_json"]
    assert metrics == {"data/records_seen": 23, "data/records_skipped": 7,
                       **{f"data/skipped/{reason}": 1 for reason in reasons}}
    valid = np.concatenate([b["sample_index"][:, 0] for b in batches])
    assert len(valid[valid >= 0]) == 16
    lines = (data_dir / "mixed.jsonl").read_text().splitlines()
    for reason in reasons:  # each skip is logged with its file and line number, and the reason
        line = next(i + 1 for i, text in enumerate(lines) if f'"id": "{reason}"' in text)
        assert any(f"mixed.jsonl:line {line} ({reason}" in message for message in caplog.messages), reason
    # ceil(23 records / 4) batches even though 7 were skipped: the tail is padded with empty rows and batches.
    assert len(batches) == 6 and (batches[-1]["segment_ids"] == 0).all()


def test_skip_fraction_limit_stops_the_run(data_dir):
    config = _config(data_dir, max_skip_fraction=0.2, min_records_checked=5, shuffle=False)
    config.image_root = str(data_dir)  # wrong image root: every image is missing
    iterator = _iterator("train", config)
    with pytest.raises(pipeline.DataSkipLimitError, match=r"skipped 4 of 5 records.*missing_image.*image_root"):
        for _ in range(2):  # without packing a batch reads exactly its 4 rows' records: the 5th is in batch 2
            next(iterator)
    iterator.close()


def test_process_shards_are_disjoint_and_equal_length(data_dir):
    config = _config(data_dir, "mixed.jsonl", max_skip_fraction=1.0, eval_batch_size=4)
    per_process = []
    for index in range(2):
        batches = _all_batches(_iterator("eval", config, "leo", index, 2))
        per_process.append(batches)
        assert all(b["input_ids"].shape == (2, 128) for b in batches)  # local rows = global / processes
    assert len(per_process[0]) == len(per_process[1]) == 6  # ceil(ceil(23 / 2) / 2)
    seen = [set(np.concatenate([b["sample_index"].ravel() for b in bs]).tolist()) - {-1} for bs in per_process]
    assert not seen[0] & seen[1]
    assert seen[0] <= set(range(0, 23, 2)) and seen[1] <= set(range(1, 23, 2))
    assert len(seen[0] | seen[1]) == 16


def test_to_global_batch_builds_sharded_arrays():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    local = {"input_ids": rng.integers(0, 100, (8, 16)).astype(np.int32),
             "tiles": rng.integers(0, 255, (8, 3, 4, 4, 3)).astype(np.uint8)}
    out = pipeline.to_global_batch(local, mesh, P("data"))
    for key, value in local.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype
        assert out[key].sharding.spec == P("data")
        np.testing.assert_array_equal(np.asarray(out[key]), value)
    assert out["input_ids"].addressable_shards[0].data.shape == (2, 16)
    per_key = pipeline.to_global_batch(local, mesh, {"input_ids": P("data", "model"), "tiles": P()})
    assert per_key["input_ids"].addressable_shards[0].data.shape == (2, 8)
    assert per_key["tiles"].sharding.spec == P()


def test_each_epoch_is_a_new_permutation(data_dir):
    config = _config(data_dir, num_epochs=2, seed=3)
    batches = _all_batches(_iterator("train", config))
    order = np.concatenate([b["sample_index"][:, 0] for b in batches]).tolist()
    assert len(order) == 48
    first, second = order[:24], order[24:]
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second and first != list(range(24))


def test_array_record_shards_give_the_same_batches_as_json(data_dir, tmp_path):
    from leo_jax.data import to_arrayrecord

    dataset_path, stats = to_arrayrecord.convert(
        str(data_dir / "good.jsonl"), str(tmp_path / "tfds"), str(data_dir / "images"), progress=False)
    assert stats == {"converted": 24}
    from_json = _all_batches(_iterator("eval", _config(data_dir)))
    shard_config = _config(data_dir)
    shard_config.eval_files = dataset_path
    from_shards = _all_batches(_iterator("eval", shard_config))
    _assert_same_batches(from_shards, from_json)


def test_exact_resume_over_array_record(data_dir, tmp_path):
    """LEO-MINI training batches from ArrayRecord shards equal those from the JSON source (tokens, labels, pixels),
    and an iterator restored from a saved state continues with exactly the next batches."""
    from leo_jax.data import to_arrayrecord

    dataset_path, _ = to_arrayrecord.convert(str(data_dir / "good.jsonl"), str(tmp_path / "ar"),
                                             str(data_dir / "images"), records_per_shard=5, progress=False)
    json_config = _config(data_dir, packing=True, max_samples_per_row=3, num_epochs=None, seed=5)
    from_json = _iterator("train", json_config, "leo_mini")
    reference = _take(from_json, 6)
    from_json.close()
    config = _config_copy(json_config, train_files=dataset_path)
    first = _iterator("train", config, "leo_mini")
    head = _take(first, 2)
    (tmp_path / "state").mkdir()
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path / "state"), item=first)
    first.close()
    resumed = _iterator("train", config, "leo_mini")
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path / "state"), item=resumed)
    tail = _take(resumed, 4)
    resumed.close()
    _assert_same_batches(head + tail, reference)
    assert sum(int(b["image_mask"].sum()) for b in reference) > 0
