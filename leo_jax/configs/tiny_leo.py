"""Tiny LEO for CPU: InternViT + SAM per tile, two LayerNorm-MLP projectors, interleaved tokens, InternLM2-layout
LLM; 56 px tiles (SAM enlarges them to 64 px on device), the shipped synthetic tokenizer, LEO's conversation
template."""

from leo_jax.configs import common, leo_8b, tiny_llm
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH, load_tokenizer

TILE = 56


def get_config():
    config = leo_8b.get_config()
    tokenizer = load_tokenizer(SYNTHETIC_TOKENIZER_PATH)
    config.model.intern_vit.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, patch_size=7,
                                   image_size=TILE, drop_path_rate=0.0, dtype="float32")
    config.model.sam.update(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=64,
                            output_channels=64, window_size=4, global_attn_indexes=(1,), global_query_chunk_rows=0,
                            dtype="float32")
    # 8x8 neck map -> 4x4 = 16 tokens, as InternViT's 8x8 grid after shuffle; the neck's 64 channels make mlp2's input
    # 64 * 2^2 = 256 = mlp1's (64 * (1 / 0.5)^2), the width the official LEO code gives mlp2
    config.model.sam_unshuffle = 2
    llm = tiny_llm.get_config("internlm2_7b").model
    llm.update(vocab_size=576, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    config.model.llm = common.encoder_fields(llm)[1]
    config.model.projector = dict(layer_norm=True, act="gelu", dtype="float32")
    config.model.image_context_id = tokenizer.token_to_id("<IMG_CONTEXT>")
    # One 56 px tile per image (the synthetic images are square, so a 2-tile budget never tiled them), two images
    # per sample: rows of 2 tile slots (derived), two-image questions are trained, not skipped.
    config.data.leo.max_tiles = 1
    config.data.leo.max_images_per_sample = 2
    config.data.tokenizer = SYNTHETIC_TOKENIZER_PATH
    # LEO's fixed system message alone is 83 tokens of the synthetic tokenizer (byte pieces); a 2-tile question row
    # with its follow-ups then takes up to ~210 tokens
    config.data.seq_len = 224
    config.data.global_batch_size = 16
    config.data.eval_batch_size = 16
    return config
