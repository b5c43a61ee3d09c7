"""leo_jax.viz (metrics reading, heat maps, figures) and LeoMini.cotr_attention (the weights the pictures show)."""

import io
import json

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from flax import nnx

matplotlib.use("Agg")

from leo_jax import viz  # noqa: E402
from leo_jax.config import load_config  # noqa: E402
from leo_jax.data import pipeline, synthetic, visual  # noqa: E402
from leo_jax.models.leo_mini import expert_pixels, expert_tokens  # noqa: E402
from leo_jax.models.registry import build_model  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_metrics_records_series_and_last_accuracy(tmp_path):
    records = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0},
               {"step": 20, "eval/color/accuracy": 0.2, "eval/color/majority_accuracy": 0.17},
               {"step": 30, "loss": 1.5},
               {"step": 30, "eval/color/accuracy": 0.6, "eval/color/majority_accuracy": 0.17,
                "eval/shape/accuracy": 0.5, "eval/shape/majority_accuracy": 0.34, "eval/exact_match": 0.55}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    read = viz.read_metrics(tmp_path)
    assert read == records
    steps, loss = viz.series(read, "loss")
    assert steps.tolist() == [10, 20, 30] and loss.tolist() == [3.0, 2.0, 1.5]
    assert viz.accuracy_by_type(read) == {"color": (0.6, 0.17), "shape": (0.5, 0.34)}
    fig = viz.plot_training_curves(tmp_path)
    assert len(fig.axes) == 2 and _png(fig).startswith(b"\x89PNG")
    with pytest.raises(KeyError, match="'grad_norm'.*logged keys"):
        viz.plot_training_curves(read, keys=("grad_norm",))


def test_metrics_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl.*--workdir"):
        viz.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        viz.read_metrics(tmp_path)


def test_overlay_puts_a_token_weight_on_its_block_of_pixels():
    """All weight on token 6 of a 4 x 4 grid (row 1, col 2) of a 64 px image lights exactly pixels 16..31 x 32..47."""
    weights = np.zeros(16)
    weights[6] = 1.0
    heat = viz.attention_heatmap(weights)
    assert heat.shape == (4, 4) and heat[1, 2] == 1.0
    image = np.full((64, 64, 3), 128, np.uint8)
    out = viz.overlay(image, heat, alpha=0.5)
    lit = np.zeros((64, 64), bool)
    lit[16:32, 32:48] = True
    brightness = out.sum(-1)
    assert brightness[lit].min() > brightness[~lit].max() + 0.5
    np.testing.assert_allclose(out[~lit], out[0, 0][None].repeat((~lit).sum(), 0))  # the rest is uniform
    with pytest.raises(ValueError, match="not a square grid"):
        viz.attention_heatmap(np.ones(12))
    assert viz.attention_heatmap(np.ones(12), grid=(3, 4)).shape == (3, 4)


def test_attention_routing_and_tile_figures():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(64), size=16)
    fig = viz.plot_attention_maps(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), weights, ncols=8, title="t")
    assert sum(bool(ax.images) for ax in fig.axes) == 16
    load = {"color": rng.dirichlet(np.ones(3), size=2), "shape": rng.dirichlet(np.ones(3), size=2)}
    fig = viz.plot_routing(load)
    assert sum(bool(ax.images) for ax in fig.axes) == 2 and _png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="must be \\[layers, experts\\]"):
        viz.plot_routing(np.ones(3))
    tiles = [np.zeros((8, 8, 3), np.uint8)] * 3
    fig = viz.plot_tiles(np.zeros((8, 16, 3), np.uint8), tiles, (2, 1))
    assert sum(bool(ax.images) for ax in fig.axes) == 4


def test_leo_mini_cotr_attention_makes_its_visual_tokens(tmp_path):
    """LeoMini.cotr_attention on a real pipeline batch: projector(concat_i(A_i I_i)) recomputed from the returned
    weights and independently computed expert tokens equals the visual tokens the forward pass writes into the
    LLM input."""
    synthetic.write_dataset(tmp_path / "data", 4, seed=0, val_num=1, multi_turn_fraction=0.0,
                            multi_image_fraction=0.0, text_only_fraction=0.0)
    config = load_config("tiny_leo_mini")
    config.data.update(train_files=str(tmp_path / "data" / "data.json"), global_batch_size=2, shuffle=False)
    iterator = pipeline.make_train_iterator(config.data, visual.for_config(config), process_index=0, process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(iter(iterator)).items() if k != "sample_index"}
    model = build_model(config.model, nnx.Rngs(0))
    weights = model.cotr_attention(batch)
    assert list(weights) == ["clip", "convnext"]
    assert weights["clip"].shape == (2, 1, 16, 64) and weights["convnext"].shape == (2, 1, 16, 16)
    reduced = []
    for spec in model.specs:
        pixels = batch[spec.batch_key][:, 0]
        tokens, _ = expert_tokens(spec, model.experts[spec.name], expert_pixels(spec, pixels))
        reduced.append(jnp.einsum("bqn,bnd->bqd", weights[spec.name][:, 0], tokens))
    recomputed = np.asarray(model.projector(jnp.concatenate(reduced, axis=-1)))
    embeds, _ = model.embed_inputs(batch)
    context = np.asarray(batch["input_ids"]) == model.cfg.image_context_id
    written = np.asarray(embeds)[context].reshape(recomputed.shape)
    diff = float(np.abs(recomputed - written).max())
    print(f"LEO-MINI visual tokens recomputed from cotr_attention: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert float(np.abs(written).max()) > 0.1
