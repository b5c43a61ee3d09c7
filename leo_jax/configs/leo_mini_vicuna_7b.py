"""LEO-MINI-Vicuna-7B: the Llama3-8B variant's experts plus SAM ViT-L (neck map resized to 24x24), Vicuna-7B v1.5
as LLM with MMoE, template vicuna_v1."""

from leo_jax.configs import common, leo_mini_llama3_8b, sam_vit_l, vicuna_7b


def get_config():
    config = leo_mini_llama3_8b.get_config(llm_preset=vicuna_7b, template="vicuna_v1")
    config.model.experts.sam = common.vision_expert(sam_vit_l.get_config().model, {"kind": "sam", "longest_edge": 1024},
                                                    grid=24)
    config.model.expert_order = (*config.model.expert_order, "sam")
    return config
