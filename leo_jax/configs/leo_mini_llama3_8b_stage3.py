"""LEO-MINI-Llama3-8B stage 3 (the paper's recipe): CoTR + MMoE (routers, general and routed LoRA experts) + projector
train on LLaVA-665K; the LLM and the vision experts are frozen. lr 2e-5, cosine, 3% warm-up, weight decay 0, 1 epoch,
max length 2048, batch 128; the MMoE balance loss weighs 0.05 (config.train.balance_loss_weight).

Start from stage 2: --config.train.init="{'': 'STAGE2_WORKDIR/checkpoints/STEP'}".
"""
from leo_jax.configs import leo_mini_llama3_8b_stage2


def get_config():
    config = leo_mini_llama3_8b_stage2.get_config()
    config.train.trainable = ("cotr/.*", "projector/.*", "llm/layers/mmoe/.*")
    config.train.frozen = ()
    # The frozen LLM still carries the LoRA experts' gradients: `full` remat, 13.5 GiB per chip on v5p-128 (README
    # "Measured"). The experts are frozen, so their remat does not matter here.
    config.model.llm.remat_policy = "full"
    return config
