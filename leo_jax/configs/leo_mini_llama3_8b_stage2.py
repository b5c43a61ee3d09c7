"""LEO-MINI-Llama3-8B stage 2 (the paper's recipe): everything trains on the SFT mix (~1.8M samples, template
'llama3'), lr 2e-5, cosine, 3% warm-up, weight decay 0, 1 epoch, max length 2048; batch 128 (LLaVA-1.5's SFT batch;
not given by the paper).

Reading of "everything": the vision experts, CoTR, projector and LLM train; the MMoE routers and LoRA experts stay
frozen at their initialisation (B = 0, so they add nothing) until stage 3 introduces them. Remove the `frozen`
pattern (--config.train.frozen="()") to train them here too.

Start from stage 1: --config.train.init="{'': 'STAGE1_WORKDIR/checkpoints/STEP'}" (a trainer checkpoint).
"""
from leo_jax.configs import leo_mini_llama3_8b_stage1


def get_config():
    config = leo_mini_llama3_8b_stage1.get_config()
    config.data.template = "llama3"
    config.data.global_batch_size = 128
    config.train.learning_rate = 2e-5
    config.train.trainable = (".*",)
    config.train.frozen = ("llm/layers/mmoe/.*",)
    # Memory (AOT compile for v5p, 2 rows per chip, README "Measured"): the trained experts' activations were most of
    # it (54.8 GiB of temporaries with the experts unrematerialised and the LLM on `full`). Recomputing the experts
    # (a few TFLOP per row, against ~33 for the LLM's forward) leaves room for the LLM to keep its matmul outputs:
    # 13.6 + 24.6 = 38.2 GiB per chip.
    for expert in config.model.experts.values():
        expert.encoder.remat_policy = "full"
    config.model.llm.remat_policy = "dots_no_batch"
    return config
