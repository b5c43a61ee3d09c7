"""LEO-8B supervised fine-tuning (the paper's recipe): both encoders frozen; projectors and InternLM2 train on the ~1M
SFT mix, lr 4e-5, weight decay 0.01, cosine, 3% warm-up, global batch 128, 1 epoch, bf16 compute, max length 8192,
template leo_internlm2_chat (InternViT drop-path and random JPEG quality on its tiles come from the model / data
config).

Start from the pre-training run: --config.train.init="{'': 'PRETRAIN_WORKDIR/checkpoints/STEP'}".
"""
from leo_jax.configs import leo_8b_pretrain


def get_config():
    config = leo_8b_pretrain.get_config()
    config.data.template = "leo_internlm2_chat"
    config.data.global_batch_size = 128
    config.train.learning_rate = 4e-5
    config.train.weight_decay = 0.01
    config.train.trainable = (".*",)
    config.train.frozen = ("intern_vit/.*", "sam/.*")
    # With splash attention and SAM's chunked global attention the LLM keeps its weight-matmul outputs instead of
    # recomputing the whole layer: AOT on v5p-128 (data 8 x fsdp 8, 2 rows per chip) 74.0 GiB per chip, under 85% of
    # the 95 GB HBM; 'full' needs 30.9 GiB (README "Measured"). Use 'full' on slices with more rows per chip.
    config.model.llm.remat_policy = "dots_no_batch"
    return config
