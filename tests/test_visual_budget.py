"""Visual budget (data.visual_budget): the pipeline lists a batch's real tiles / images in `visual_index`, the
encoders run on those only, and the logits, loss and gradients equal the every-slot path; over-budget samples are
counted skips (fixed rows) or wait for the next batch (packing); row groups follow devices and micro-batches."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leo_jax.aot import batch_shapes
from leo_jax.config import load_config
from leo_jax.data import packing, pipeline, synthetic, visual
from leo_jax.models import leo, leo_mini
from leo_jax.models.registry import build_model
from leo_jax.models.visual_tokens import gather_slots, scatter_slots
from leo_jax.sharding import build_mesh
from leo_jax.train.config import TrainConfig
from leo_jax.train.optimizer import TrainableFilter, make_optimizer
from leo_jax.train.state import create_train_state
from leo_jax.train.step import device_batch, jit_train_step, make_train_step, micro_batches
from sharding_utils import MESHES, assert_sharded_matches

PRESETS = ("tiny_leo", "tiny_leo_mini")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(out, 32, seed=1, val_num=4, multi_turn_fraction=0.0, multi_image_fraction=0.0,
                            text_only_fraction=0.5)
    return out


def _config(preset, synthetic_dir, budget=-1, **data):
    config = load_config(preset)
    config.data.update(train_files=str(synthetic_dir / "data.json"), global_batch_size=8, shuffle=False,
                       visual_budget=budget, **data)
    config.data.leo.jpeg_augment = False
    return config


def _batch(config, **layout):
    iterator = pipeline.make_train_iterator(config.data, visual.for_config(config), process_index=0,
                                            process_count=1, **layout)
    return iterator, next(iter(iterator))


def _mask_key(batch):
    return "tile_mask" if "tile_mask" in batch else "image_mask"


@pytest.mark.parametrize("preset", PRESETS)
def test_index_lists_the_real_slots_and_nothing_else_changes(preset, synthetic_dir):
    _, full = _batch(_config(preset, synthetic_dir))
    _, budgeted = _batch(_config(preset, synthetic_dir, budget=8))
    mask = full[_mask_key(full)]
    assert 0 < mask.sum() < mask.size  # text-only rows among image rows
    real = np.flatnonzero(mask.reshape(-1))
    expected = np.full(8, -1, np.int32)
    expected[:len(real)] = real
    np.testing.assert_array_equal(budgeted.pop("visual_index"), expected[None])
    assert full.keys() == budgeted.keys()
    for key in full:
        np.testing.assert_array_equal(full[key], budgeted[key], err_msg=key)


def _counting(monkeypatch, preset):
    """Records the number of items each encoder call runs on."""
    calls = []
    if preset == "tiny_leo":
        original = leo.Leo.tile_tokens

        def tile_tokens(self, tiles, sam_tiles, rng=None):
            calls.append(tiles.shape[0])
            return original(self, tiles, sam_tiles, rng)

        monkeypatch.setattr(leo.Leo, "tile_tokens", tile_tokens)
    else:
        original = leo_mini.expert_tokens

        def expert_tokens(spec, encoder, pixels, *rest):
            calls.append(pixels.shape[0])
            return original(spec, encoder, pixels, *rest)

        monkeypatch.setattr(leo_mini, "expert_tokens", expert_tokens)
    return calls


def _loss(model, batch):
    out = model.train_forward(batch)
    logp = jax.nn.log_softmax(out.out, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0), out.out


@pytest.mark.parametrize("preset", PRESETS)
def test_encoders_run_on_real_items_only_with_equal_logits_and_gradients(preset, synthetic_dir, monkeypatch):
    config = _config(preset, synthetic_dir, budget=8)
    _, batch = _batch(config)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "sample_index"}
    reference = {k: v for k, v in batch.items() if k != "visual_index"}
    model = build_model(config.model, nnx.Rngs(0))
    calls = _counting(monkeypatch, preset)
    grad = nnx.value_and_grad(_loss, has_aux=True)
    (loss, logits), grads = grad(model, batch)
    budget_calls, calls[:] = list(calls), []
    (ref_loss, ref_logits), ref_grads = grad(model, reference)
    slots = reference[_mask_key(reference)].size
    experts = 1 if preset == "tiny_leo" else len(config.model.expert_order)
    assert budget_calls == [8] * experts and calls == [slots] * experts  # 8 of 16 slots, half the rows text-only
    diff = float(jnp.max(jnp.abs(logits - ref_logits)))
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    print(f"{preset}: max |logits diff| {diff:.2e}, |loss diff| {abs(float(loss - ref_loss)):.2e}, "
          f"max |grad diff| {grad_diff:.2e}")
    assert diff < 1e-4 and abs(float(loss - ref_loss)) < 1e-5 and grad_diff < 1e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_sharded_budget_forward_equals_the_every_slot_forward(preset, synthetic_dir):
    """Groups per device (8 batch shards): the gathers stay on each device's rows; the logits on an 8-device
    data x fsdp mesh equal the single-device every-slot logits."""
    config = _config(preset, synthetic_dir, budget=16)
    _, batch = _batch(config, batch_shards=8)
    assert batch["visual_index"].shape == (8, 2)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "sample_index"}
    model = build_model(config.model, nnx.Rngs(0))
    reference = model.train_forward({k: v for k, v in batch.items() if k != "visual_index"}).out
    keys = sorted(batch)
    worst = assert_sharded_matches(model, lambda m, *xs: m.train_forward(dict(zip(keys, xs))).out - reference,
                                   tuple(batch[k] for k in keys), meshes=MESHES[1:2], atol=1e-4)
    print(f"{preset}: max |sharded budget logits - every-slot logits| {worst:.2e}")


def test_groups_follow_devices_and_micro_batches():
    """With 4 device blocks x 2 micro-batches, every micro-batch's index lists exactly its own real slots."""
    rng = np.random.default_rng(0)
    layout = packing.BatchLayout(batch_size=16, seq_len=8, visual_capacity=3, visual_mask_key="tile_mask",
                                 visual_specs={"tiles": ((1,), np.int32)}, pad_id=0, group_budget=6,
                                 budget_groups=8, budget_accum=2)
    rows = []
    for r in range(16):
        n = int(rng.integers(0, 4))
        rows.append([{"input_ids": np.ones(4, np.int32), "loss_mask": np.ones(4, bool),
                      "prompt_mask": np.zeros(4, bool), "sample_index": r,
                      "tiles": 1000 * r + np.arange(n, dtype=np.int32)[:, None]}])
    batch = layout.collate(rows)
    assert batch["visual_index"].shape == (8, 6)
    micro = micro_batches({k: jnp.asarray(batch[k]) for k in ("tiles", "tile_mask", "visual_index")}, 2)
    for i in range(2):
        index = micro["visual_index"][i]
        tiles, mask = micro["tiles"][i], micro["tile_mask"][i]
        taken = np.asarray(gather_slots(tiles, index))[np.asarray(index).reshape(-1) >= 0, 0]
        assert sorted(taken) == sorted(np.asarray(tiles)[np.asarray(mask)][:, 0])
        back = scatter_slots(gather_slots(tiles, index), index, *mask.shape)
        np.testing.assert_array_equal(back, np.where(mask[..., None], tiles, 0))


def test_over_budget_samples_are_counted_skips_without_packing(synthetic_dir):
    config = _config("tiny_leo", synthetic_dir, budget=2)
    full_it, full = _batch(_config("tiny_leo", synthetic_dir))
    iterator, batch = _batch(config)
    real = int(full["tile_mask"].sum())
    assert real > 2
    assert int(batch["tile_mask"].sum()) == 2 and (batch["visual_index"] >= 0).all()
    skipped = iterator.skip_stats.skipped[pipeline.OVER_VISUAL_BUDGET]
    assert skipped == real - 2  # every image row past the budget (one tile each) left its row empty
    kept = batch["sample_index"][:, 0] >= 0
    np.testing.assert_array_equal(batch["sample_index"][kept, 0], full["sample_index"][kept, 0])


def test_over_budget_samples_wait_for_the_next_batch_with_packing(synthetic_dir):
    _, full = _batch(_config("tiny_leo", synthetic_dir, packing=True))
    iterator, first_batch = _batch(_config("tiny_leo", synthetic_dir, budget=2, packing=True))
    budgeted = [first_batch] + [next(iterator) for _ in range(3)]
    assert all(int(b["tile_mask"].sum()) <= 2 for b in budgeted)
    assert not iterator.skip_stats.skipped[pipeline.OVER_VISUAL_BUDGET]
    seen = collections.Counter(int(i) for b in budgeted for i in b["sample_index"].reshape(-1) if i >= 0)
    assert all(n == 1 for n in seen.values())  # no sample lost or repeated, only moved to a later batch
    first = {int(i) for i in full["sample_index"].reshape(-1) if i >= 0}
    assert first <= set(seen)


@pytest.mark.parametrize("budget, shards, match", [(0, 1, "use -1"), (12, 8, "multiple of the 8 row groups"),
                                                   (8, 3, "divide evenly")])
def test_bad_budgets_are_clear_errors(synthetic_dir, budget, shards, match):
    with pytest.raises(ValueError, match=match):
        _batch(_config("tiny_leo", synthetic_dir, budget=budget), batch_shards=shards)


def test_abstract_batch_has_the_pipeline_index(synthetic_dir):
    """The AOT compile's batch shapes carry the same `visual_index` as the pipeline's batches (4 device blocks x 2
    micro-batches)."""
    config = _config("tiny_leo_mini", synthetic_dir, budget=8)
    kind = visual.for_config(config)
    _, batch = _batch(config, batch_shards=4, grad_accum_steps=2)
    abstract = batch_shapes(config, kind, batch_shards=4, grad_accum_steps=2)
    assert abstract["visual_index"].shape == batch["visual_index"].shape == (8, 1)
    batch.pop("sample_index")
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}


def test_train_step_compiles_once_with_the_budget(synthetic_dir):
    """Batches with their real tiles in different slots share one compiled step (the index has a fixed size)."""
    config = _config("tiny_leo_train", synthetic_dir, budget=8)
    iterator, first = _batch(config)
    second = next(iterator)
    assert not np.array_equal(first["visual_index"], second["visual_index"])
    train = TrainConfig.from_config(config.train)
    tx, schedule = make_optimizer(train, 10)
    mesh = build_mesh({"ici": {"data": 1}}, devices=jax.devices()[:1])
    graphdef, state, shardings = create_train_state(lambda rngs: build_model(config.model, rngs),
                                                    TrainableFilter(train.trainable, train.frozen), tx, 0, mesh)
    batches = [{k: jnp.asarray(v) for k, v in device_batch(b).items()} for b in (first, second)]
    step = jit_train_step(make_train_step(graphdef, tx, schedule, grad_accum_steps=1, balance_loss_weight=0.0),
                          shardings, batches[0], mesh)
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = step(state, batch)
            assert np.isfinite(float(metrics["loss"])) and int(metrics["visual_token_mismatch"]) == 0
    assert step._cache_size() == 1
