"""LEO-8B (SPEC 2.1): InternViT-300M-448px + SAM ViT-L per 448 px tile (up to 6 + thumbnail), each with its own
LayerNorm-MLP projector, 512 interleaved tokens per tile, InternLM2-chat-7B; template leo_internlm2_chat (the
official LEO conversation format), max length 8192."""

from leo_jax.models.leo import LeoConfig

from leo_jax.configs import common, common_data, intern_vit_300m, internlm2_7b, sam_vit_l


def get_config():
    config = common.get_config()
    config.model = common.model_section(
        "leo", LeoConfig, intern_vit=common.encoder_fields(intern_vit_300m.get_config().model)[1],
        sam=common.encoder_fields(sam_vit_l.get_config().model)[1],
        llm=common.encoder_fields(internlm2_7b.get_config().model)[1], projector=dict(layer_norm=True, act="gelu"),
        intern_unshuffle=0.5, sam_unshuffle=4)
    config.data = common_data.get_config()
    config.data.template = "leo_internlm2_chat"
    config.data.seq_len = 8192
    return config
