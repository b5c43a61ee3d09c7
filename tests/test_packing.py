"""Packing: first-fit rows, segment isolation of the derived attention mask, labels and positions per sample."""
import numpy as np
import pytest

from leo_jax.data import packing

PAD = 0
TILE = 4  # px of the toy tiles


def _sample(index, length, n_tiles, rng, answer_from=None):
    """A toy sample: random ids (never PAD), answer tokens from `answer_from` on, n_tiles random tiles."""
    answer_from = length // 2 if answer_from is None else answer_from
    loss_mask = np.zeros(length, np.bool_)
    loss_mask[answer_from:] = True
    prompt_mask = np.zeros(length, np.bool_)
    prompt_mask[1:answer_from] = True
    return {
        "input_ids": rng.integers(1, 1000, length).astype(np.int32),
        "loss_mask": loss_mask,
        "prompt_mask": prompt_mask,
        "sample_index": index,
        "tiles": rng.integers(0, 256, (n_tiles, TILE, TILE, 3)).astype(np.uint8),
        "sam_tiles": rng.integers(0, 256, (n_tiles, 2 * TILE, 2 * TILE, 3)).astype(np.uint8),
    }


def _layout(batch_size=2, seq_len=32, capacity=6, max_segments=3, buckets=()):
    return packing.BatchLayout(
        batch_size=batch_size,
        seq_len=seq_len,
        visual_capacity=capacity,
        visual_mask_key="tile_mask",
        visual_specs={"tiles": ((TILE, TILE, 3), np.uint8), "sam_tiles": ((2 * TILE, 2 * TILE, 3), np.uint8)},
        pad_id=PAD,
        max_segments=max_segments,
        seq_buckets=buckets,
    )


def _packed_batch():
    rng = np.random.default_rng(0)
    samples = [
        _sample(10, 12, 3, rng),  # row 0
        _sample(11, 14, 2, rng),  # row 0 (12 + 14 <= 32, 3 + 2 <= 6)
        _sample(12, 9, 0, rng),  # text-only: row 0 is 26 tokens -> row 1
        _sample(13, 10, 2, rng),  # row 1
        _sample(14, 6, 1, rng),  # row 0 (26 + 6 = 32, 5 + 1 = 6) -> row 0 full
    ]
    batch = packing.FirstFitBatch(_layout())
    for s in samples:
        assert batch.add(s)
    return samples, batch


def test_first_fit_placement_and_batch_full():
    samples, batch = _packed_batch()
    assert [[s["sample_index"] for s in row] for row in batch.rows] == [[10, 11, 14], [12, 13]]
    rng = np.random.default_rng(1)
    # Row 1 has 19 tokens / 2 tiles: a 14-token sample fits nowhere -> the batch is complete.
    assert not batch.add(_sample(15, 14, 1, rng))
    assert batch.add(_sample(16, 13, 4, rng))  # fits row 1 exactly (32 tokens, 6 tiles)
    assert batch.is_full  # both rows hold max_segments=3 samples
    assert batch.add(_sample(17, 1, 0, rng)) is False
    assert not batch.fits_alone(_sample(18, 33, 0, rng)) and not batch.fits_alone(_sample(19, 4, 7, rng))


def test_no_packing_is_plain_batching():
    rng = np.random.default_rng(2)
    batch = packing.FirstFitBatch(_layout(batch_size=2, max_segments=1))
    assert batch.add(_sample(0, 5, 1, rng)) and not batch.is_full
    assert batch.add(_sample(1, 5, 1, rng)) and batch.is_full
    out = batch.collate()
    assert out["sample_index"].tolist() == [[0], [1]]


def test_attention_never_crosses_samples_and_positions_restart():
    samples, batch = _packed_batch()
    out = batch.collate()
    seg, pos = out["segment_ids"], out["positions"]
    mask = packing.attention_mask(seg)
    for r, row in enumerate(batch.rows):
        offset = 0
        for k, s in enumerate(row):
            n = len(s["input_ids"])
            assert (seg[r, offset : offset + n] == k + 1).all()
            np.testing.assert_array_equal(pos[r, offset : offset + n], np.arange(n))
            np.testing.assert_array_equal(out["input_ids"][r, offset : offset + n], s["input_ids"])
            block = mask[r, offset : offset + n, offset : offset + n]
            np.testing.assert_array_equal(block, np.tril(np.ones((n, n), np.bool_)))
            offset += n
        assert (seg[r, offset:] == 0).all() and (out["input_ids"][r, offset:] == PAD).all()
    # Every allowed (query, key) pair lies in one segment, key not after query; padding attends to nothing.
    q_seg = np.broadcast_to(seg[:, :, None], mask.shape)
    k_seg = np.broadcast_to(seg[:, None, :], mask.shape)
    assert (q_seg[mask] == k_seg[mask]).all() and (q_seg[mask] > 0).all()
    t = np.arange(seg.shape[1])
    assert (np.broadcast_to(t[None, None, :] <= t[None, :, None], mask.shape)[mask]).all()
    expected_pairs = sum(len(s["input_ids"]) * (len(s["input_ids"]) + 1) // 2 for s in samples)
    assert mask.sum() == expected_pairs


def test_packed_attention_equals_each_sample_alone():
    """Softmax attention over a packed row with the derived mask gives each sample's stand-alone result."""
    samples, batch = _packed_batch()
    out = batch.collate()
    rng = np.random.default_rng(3)
    dim = 8
    embed = rng.normal(size=(1000, dim))

    def attend(ids, mask):
        x = embed[ids]
        scores = np.where(mask, x @ x.T / np.sqrt(dim), -1e30)
        scores = scores - scores.max(-1, keepdims=True)
        weights = np.where(mask, np.exp(scores), 0.0)
        weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-30)
        return weights @ x

    packed_mask = packing.attention_mask(out["segment_ids"])
    for r, row in enumerate(batch.rows):
        packed = attend(out["input_ids"][r], packed_mask[r])
        offset = 0
        for s in row:
            n = len(s["input_ids"])
            alone = attend(s["input_ids"], np.tril(np.ones((n, n), np.bool_)))
            np.testing.assert_allclose(packed[offset : offset + n], alone, rtol=1e-12, atol=1e-12)
            offset += n


def test_labels_shift_within_each_sample_only():
    samples, batch = _packed_batch()
    out = batch.collate()
    seg, labels, ids, loss = out["segment_ids"], out["labels"], out["input_ids"], out["loss_mask"]
    supervised = loss > 0
    # A supervised target is always the next token of the same sample.
    b, t = np.nonzero(supervised)
    assert (seg[b, t + 1] == seg[b, t]).all() and (seg[b, t] > 0).all()
    np.testing.assert_array_equal(labels[b, t], ids[b, t + 1])
    for r, row in enumerate(batch.rows):
        offset = 0
        for s in row:
            n = len(s["input_ids"])
            # Targets are the sample's own next tokens; its last token predicts nothing.
            np.testing.assert_array_equal(labels[r, offset : offset + n - 1], s["input_ids"][1:])
            np.testing.assert_array_equal(loss[r, offset : offset + n - 1], s["loss_mask"][1:].astype(np.float32))
            assert loss[r, offset + n - 1] == 0 and labels[r, offset + n - 1] == PAD
            np.testing.assert_array_equal(out["prompt_mask"][r, offset : offset + n], s["prompt_mask"])
            offset += n
    assert loss.sum() == sum(s["loss_mask"][1:].sum() for s in samples)


def test_tiles_follow_segment_order_with_mask():
    samples, batch = _packed_batch()
    out = batch.collate()
    for r, row in enumerate(batch.rows):
        tiles = np.concatenate([s["tiles"] for s in row])
        sam = np.concatenate([s["sam_tiles"] for s in row])
        n = len(tiles)
        np.testing.assert_array_equal(out["tiles"][r, :n], tiles)
        np.testing.assert_array_equal(out["sam_tiles"][r, :n], sam)
        assert out["tile_mask"][r].tolist() == [True] * n + [False] * (6 - n)
        owners = [segment + 1 for segment, s in enumerate(row) for _ in range(len(s["tiles"]))]
        assert out["tile_segment_ids"][r].tolist() == owners + [0] * (6 - n)
        assert (out["tiles"][r, n:] == 0).all()
    assert out["sample_index"].tolist() == [[10, 11, 14], [12, 13, -1]]


def test_text_only_batch_has_image_batch_shapes():
    rng = np.random.default_rng(4)
    layout = _layout()
    text_only = layout.collate([[_sample(0, 7, 0, rng)], [_sample(1, 9, 0, rng)]])
    with_images = layout.collate([[_sample(2, 7, 3, rng)], [_sample(3, 9, 6, rng)]])
    assert text_only.keys() == with_images.keys()
    for key in text_only:
        assert text_only[key].shape == with_images[key].shape, key
        assert text_only[key].dtype == with_images[key].dtype, key
    assert not text_only["tile_mask"].any()


def test_seq_buckets_pick_smallest_fitting_length():
    rng = np.random.default_rng(5)
    layout = _layout(seq_len=32, buckets=(8, 16, 32))
    assert layout.collate([[_sample(0, 7, 0, rng)], [_sample(1, 8, 0, rng)]])["input_ids"].shape == (2, 8)
    assert layout.collate([[_sample(0, 9, 0, rng)]])["input_ids"].shape == (2, 16)
    assert layout.collate([[_sample(0, 17, 1, rng)]])["labels"].shape == (2, 32)
    assert _layout(seq_len=32).collate([[_sample(0, 3, 0, rng)]])["input_ids"].shape == (2, 32)
    with pytest.raises(ValueError, match="seq_buckets"):
        _layout(seq_len=32, buckets=(16, 8, 32))
    with pytest.raises(ValueError, match="seq_buckets"):
        _layout(seq_len=32, buckets=(8, 16))
