"""FLOPs per sample follow the real number of tiles / images and the text length: tiny LEO against a hand
computation, LEO-MINI linear in images, the trainer's MFU formula fed with batch counts, and the summary CLI's
LEO vs LEO-MINI comparison."""

import re

import pytest

from leo_jax import summary
from leo_jax.config import load_config
from leo_jax.models.registry import model_config
from leo_jax.train.metrics import train_flops_per_step


def tiny_leo_hand_flops(text_tokens: int, tiles: int) -> float:
    """tiny_leo written out by hand (2 FLOPs per multiply-add)."""
    # InternViT: 56 px / patch 7 -> 8x8 patches + CLS = 65 tokens, width 64, MLP 128, 2 layers
    n, d, f = 65, 64, 128
    intern = 2 * 64 * (7 * 7 * 3) * d + 2 * n * (8 * d * d + 4 * d * f + 4 * n * d)
    # SAM: 64 px / patch 8 -> 64 tokens, width 64, MLP 128; layer 0 in 4 windows of 4x4, layer 1 global; neck to 64
    n, d, f, c = 64, 64, 128, 64
    sam = 2 * n * (8 * 8 * 3) * d + 2 * (2 * n * (4 * d * d + 2 * d * f))
    sam += 4 * (4 * 16 * 16 * d) + 4 * n * n * d
    sam += 2 * n * d * c + 2 * n * 9 * c * c
    # projectors: 16 tokens each, 256 -> 128 -> 128 (both encoders' features are 256 wide after the unshuffle)
    projectors = 2 * (2 * 16 * (256 * 128 + 128 * 128))
    per_tile = intern + sam + projectors
    # LLM: width 128, 4 heads of 32 (2 KV), MLP 256, 2 layers, vocab 576, reading text + 32 tokens per tile
    t = text_tokens + 32 * tiles
    weights = 2 * (128 * 32 * (2 * 4 + 2 * 2) + 3 * 128 * 256) + 128 * 576
    llm = 2 * t * weights + 2 * 2 * 4 * 32 * t * t
    return float(llm + tiles * per_tile)


@pytest.mark.parametrize("tiles", [1, 7])
def test_leo_flops_follow_tiles_and_match_a_hand_computation(tiles):
    cfg = model_config(load_config("tiny_leo").model)
    visual, llm_tokens, flops = summary.sample_flops(cfg, 100, summary.visual_counts(tiles, 1))
    assert (visual, llm_tokens) == (32 * tiles, 100 + 32 * tiles)
    assert flops == pytest.approx(tiny_leo_hand_flops(100, tiles), rel=1e-12)


def test_leo_mini_flops_are_linear_in_images_and_text_counts_once():
    cfg = model_config(load_config("tiny_leo_mini").model)
    per_image = cfg.image_forward_flops(80)
    assert per_image > 0
    f0, f1, f3 = (cfg.forward_flops(80, images) for images in (0, 1, 3))
    assert f0 == pytest.approx(cfg.llm.forward_flops(80), rel=1e-12)
    assert f1 - f0 == pytest.approx(per_image, rel=1e-12) and f3 - f0 == pytest.approx(3 * per_image, rel=1e-12)
    assert summary.sample_flops(cfg, 64, summary.visual_counts(7, 2))[:2] == (32, 96)  # 16 tokens per image


def test_train_flops_per_step_counts_the_batch_tiles():
    """A step of 4 rows with 6 real tiles costs 3 x (4 LLM rows + 6 tiles), not 4 x 7 tiles; without counts the
    config's default (7 tiles per row) stays."""
    cfg = model_config(load_config("tiny_leo").model)
    got = train_flops_per_step(cfg, 224, 4, 0, {"tokens": 500.0, "tiles": 6.0})
    assert got == pytest.approx(3 * (4 * cfg.llm.forward_flops(224) + 6 * cfg.tile_forward_flops()), rel=1e-12)
    assert train_flops_per_step(cfg, 224, 4, 0) == pytest.approx(3 * 4 * cfg.forward_flops(224, 7), rel=1e-12)
    llm = model_config(load_config("tiny_llm").model)  # no visual count: the batch counts change nothing
    assert train_flops_per_step(llm, 64, 2, 0, {"tokens": 100.0}) == 3 * 2 * llm.forward_flops(64)


def test_summary_cli_compares_leo_and_leo_mini_at_the_given_counts(capsys):
    assert summary.main(["--config", "tiny_leo", "--compare", "tiny_leo_mini", "--tiles", "1", "--images", "1",
                         "--text-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "100 text tokens + 1 tiles (32 visual tokens) = 132 LLM tokens" in out
    leo = re.search(r"^tiny_leo +1 tiles +32 +132 +\S+ +1\.000$", out, re.MULTILINE)
    mini = re.search(r"^tiny_leo_mini +1 images +16 +116 +\S+ +([\d.]+)$", out, re.MULTILINE)
    assert leo and mini, out
    cfg = model_config(load_config("tiny_leo_mini").model)
    expected = cfg.forward_flops(116, 1) / tiny_leo_hand_flops(100, 1)
    assert float(mini.group(1)) == pytest.approx(expected, abs=5e-4)


def test_summary_cli_rejects_negative_counts_and_unknown_presets(capsys):
    with pytest.raises(SystemExit):
        summary.main(["--config", "tiny_leo", "--tiles", "-1"])
    assert "--tiles=-1: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summary.main(["--config", "tiny_leo", "--compare", "no_such_preset"])
    assert "--compare no_such_preset" in capsys.readouterr().err
