"""Writes tests/golden/eva02_tiny_timm.npz: tiny random timm EVA-02 towers, their inputs and timm's outputs.

Run where timm (and torchvision) are installed, from the repository root:
    python tests/golden/make_eva02_golden.py
The checked-in file was made with timm 1.0.31 on the CPU torch 2.13.0 in a scratch venv: `pip install torch==2.13.0
numpy`, `pip install --no-deps torchvision==0.28.0` with its torchvision/_meta_registrations.py emptied (its C ops
are CUDA builds), then `pip install -c constraints.txt timm` with torch==2.13.0 pinned in constraints.txt.
tests/test_vision_eva02.py then checks leo_jax's EVA-02 (imported through the eva02 conversion family) and the
PyTorch reference in leo_jax/pytorch/eva02.py against these numbers. Two variants cover timm's layouts:
'clip' (separate q/k/v projections, sub-LN in attention, SwiGLU with its norm, final norm: eva02_*_clip_*) and
'mim' (fused qkv with q/v biases, packed GluMlp without norm, avg-pool without the final norm: eva02_tiny/small).
Weights are rounded to float16 before the forward so that the stored (float16) weights are exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).with_name("eva02_tiny_timm.npz")
COMMON = dict(img_size=(16, 24), patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3,
              ref_feat_shape=(3, 3))
VARIANTS = {"clip": dict(COMMON, qkv_fused=False, scale_mlp=True, scale_attn_inner=True, global_pool="token"),
            "mim": dict(COMMON, qkv_fused=True, scale_mlp=False, scale_attn_inner=False, global_pool="avg")}


def timm_factory(args: dict) -> torch.nn.Module:
    from timm.models.eva import Eva

    return Eva(**args, swiglu_mlp=True, use_rot_pos_emb=True, num_classes=0)


def build_golden(factory, producer: str, out: Path = OUT, seed: int = 0) -> Path:
    """`factory(eva_args)` -> a module with timm's state-dict names and `forward_features`."""
    gen = torch.Generator().manual_seed(seed)
    arrays: dict[str, np.ndarray] = {"producer": np.array(producer)}
    for name, args in VARIANTS.items():
        model = factory(args).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p + 0.1 * torch.randn(p.shape, generator=gen)).half().float())
        h, w = args["img_size"]
        pixels = torch.randn(2, 3, h, w, generator=gen)
        with torch.no_grad():
            features = model.forward_features(pixels)
        arrays[f"{name}/config"] = np.array(json.dumps({**args, "model_type": "eva02"}))
        arrays[f"{name}/pixels"] = pixels.numpy()
        arrays[f"{name}/features"] = features.numpy()
        for key, value in model.state_dict().items():
            arrays[f"{name}/param/{key}"] = value.half().numpy()
    np.savez_compressed(out, **arrays)
    return out


if __name__ == "__main__":
    import timm

    print("wrote", build_golden(timm_factory, f"timm {timm.__version__}"))
