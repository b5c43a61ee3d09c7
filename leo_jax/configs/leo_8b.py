"""LEO-8B: InternViT-300M-448px + SAM ViT-L per 448 px tile (up to 6 + thumbnail), each with its own LayerNorm-MLP
projector, 512 interleaved tokens per tile, InternLM2-chat-7B; template leo_internlm2_chat (the official LEO
conversation format), max length 8192.

Vocabulary: LEO's fine-tuning adds 9 special tokens to InternLM2-chat's 92,544 (<img>, </img>, <IMG_CONTEXT>, <quad>,
</quad>, <ref>, </ref>, <box>, </box>, in that order) and resizes the embeddings, so the LLM has 92,553 rows and
<IMG_CONTEXT> is id 92,546, the id the official code reads from its tokenizer."""

from leo_jax.configs import common, common_data, intern_vit_300m, internlm2_7b, sam_vit_l
from leo_jax.models.leo import LeoConfig

INTERNLM2_VOCAB = 92544  # InternLM2-chat-7B's tokenizer; LEO appends its 9 tokens after it


def get_config():
    config = common.get_config()
    config.model = common.model_section(
        "leo", LeoConfig, intern_vit=common.encoder_fields(intern_vit_300m.get_config().model)[1],
        sam=common.encoder_fields(sam_vit_l.get_config().model)[1],
        llm={**common.encoder_fields(internlm2_7b.get_config().model)[1], "vocab_size": INTERNLM2_VOCAB + 9},
        projector=dict(layer_norm=True, act="gelu"), intern_unshuffle=0.5, sam_unshuffle=4,
        image_context_id=INTERNLM2_VOCAB + 2)
    config.data = common_data.get_config()
    config.data.template = "leo_internlm2_chat"
    config.data.seq_len = 8192
    return config
