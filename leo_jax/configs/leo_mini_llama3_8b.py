"""LEO-MINI-Llama3-8B: CLIP-L/14-336, EVA-02-L/14-336, ConvNeXt-L (1024 px, last stage resized to
24x24) and Pix2Struct-L (576 patches) -> CoTR to 64 tokens per image -> MLP projector -> Llama-3-8B with MMoE
(3 routed rank-16 LoRA experts + a general one on every MLP down projection). Template llama3, max length 2048.

Points the paper leaves open and the defaults chosen here: CoTR pooling 'sum' (config.model.cotr.pooling), scores scaled
by 1/sqrt(d_i) (cotr.scale), MMoE on down_proj only (llm.mmoe.targets), gates = router probability (mmoe.gate_mode),
Switch balance loss (trainer weight 0.05). Multi-turn data: CoTR and the routers see, for exchange k, the user
turns 1..k (config.model.conditioning = 'turns_so_far'; see leo_jax.models.leo_mini).
"""

from leo_jax.configs import (
    clip_vit_l14_336,
    common,
    common_data,
    convnext_large,
    eva02_large_336,
    llama3_8b,
    pix2struct_large,
)
from leo_jax.models.leo_mini import LeoMiniConfig

MMOE = dict(num_experts=3, rank=16, alpha=16.0, general_rank=16, general_alpha=16.0, top_k=1, targets=("down_proj",),
            router_hidden=256, router_cond_dim=256, gate_mode="prob")


def experts() -> dict:
    """`experts` keyed by name and `expert_order` (CoTR and projector order: CLIP, EVA-02, ConvNeXt, Pix2Struct)."""
    return common.vision_experts(
        clip=common.vision_expert(clip_vit_l14_336.get_config().model,
                                  {"kind": "clip", "shortest_edge": 336, "crop_size": 336}),
        eva02=common.vision_expert(eva02_large_336.get_config().model, {"kind": "eva02", "size": 336}),
        convnext=common.vision_expert(convnext_large.get_config().model, {"kind": "convnext", "shortest_edge": 1024},
                                      grid=24),
        pix2struct=common.vision_expert(pix2struct_large.get_config().model,
                                        {"kind": "pix2struct", "max_patches": 576, "patch_size": 16}),
    )


def get_config(llm_preset=llama3_8b, template: str = "llama3"):
    config = common.get_config()
    _, llm = common.encoder_fields(llm_preset.get_config().model)
    llm["mmoe"] = dict(MMOE)
    config.model = common.model_section(
        "leo_mini", LeoMiniConfig, **experts(), llm=llm,
        cotr=dict(num_queries=64, proj_width=256, pooling="sum", scale="sqrt_expert_width"),
        projector=dict(layer_norm=False, act="gelu"))
    config.data = common_data.get_config()
    config.data.template = template
    config.data.seq_len = 2048
    return config
