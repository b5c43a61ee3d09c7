"""Tiny LEO-MINI for CPU: the LEO-MINI-Llama3-8B structure (experts -> CoTR -> projector -> LLM with MMoE) at toy
size, on 64 px images and the shipped synthetic tokenizer. Two experts of different kinds (a CLIP ViT and a
ConvNeXt whose feature map is resized to its token grid) so CoTR mixes experts of different widths."""

from leo_jax.configs import clip_vit_l14_336, common, convnext_large, leo_mini_llama3_8b, tiny_llm
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH, load_tokenizer

IMAGE = 64


def tiny_experts() -> dict:
    clip = clip_vit_l14_336.get_config().model
    clip.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, patch_size=8, image_size=IMAGE,
                output_layer=-1, dtype="float32")
    convnext = convnext_large.get_config().model
    convnext.update(hidden_sizes=(32, 48), depths=(1, 1), image_size=IMAGE, output_stage=-1, dtype="float32")
    return common.vision_experts(
        clip=common.vision_expert(clip, {"kind": "clip", "shortest_edge": IMAGE, "crop_size": IMAGE}),
        convnext=common.vision_expert(convnext, {"kind": "convnext", "shortest_edge": IMAGE, "crop_pct": 1.0}, grid=4))


def get_config():
    config = leo_mini_llama3_8b.get_config()
    tokenizer = load_tokenizer(SYNTHETIC_TOKENIZER_PATH)
    llm = tiny_llm.get_config("llama3_8b").model
    llm.update(vocab_size=576, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
               bos_token_id=tokenizer.bos_id, eos_token_id=(tokenizer.eos_id,), pad_token_id=tokenizer.pad_id)
    _, llm_fields = common.encoder_fields(llm)
    llm_fields["mmoe"] = dict(leo_mini_llama3_8b.MMOE, rank=4, general_rank=4, router_hidden=32, router_cond_dim=16)
    for key, value in tiny_experts().items():  # replaces the full-size experts (update() would merge them)
        config.model[key] = value
    config.model.llm = llm_fields
    config.model.cotr = dict(num_queries=16, proj_width=32, pooling="sum", scale="sqrt_expert_width",
                             dtype="float32")
    config.model.projector = dict(layer_norm=False, act="gelu", dtype="float32")
    config.model.image_context_id = tokenizer.token_to_id("<IMG_CONTEXT>")
    config.data.tokenizer = SYNTHETIC_TOKENIZER_PATH
    config.data.template = "llama3"
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.data.eval_batch_size = 16
    return config
