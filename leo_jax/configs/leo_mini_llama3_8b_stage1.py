"""LEO-MINI-Llama3-8B stage 1 (the paper's recipe): projector pre-training on the LLaVA pretrain set (image-caption
pairs, template 'plain'); everything else frozen. lr 1e-3, cosine, 3% warm-up, weight decay 0, 1 epoch, bf16
compute, max length 2048. The paper gives no batch size: LLaVA-1.5's pre-training batch, 256.

    python -m leo_jax.train --config leo_mini_llama3_8b_stage1 --workdir gs://.../stage1 \\
      --config.data.train_files=/data/llava_pretrain/blip_laion_cc_sbu_558k.json \\
      --config.data.image_root=/data/llava_pretrain/images --config.data.tokenizer=/ckpt/llama3_8b \\
      --config.train.init="{'llm': '/ckpt/llama3_8b', 'experts/clip': '/ckpt/clip', 'experts/eva02': '/ckpt/eva02',
                            'experts/convnext': '/ckpt/convnext', 'experts/pix2struct': '/ckpt/pix2struct'}"
(init directories: `python -m leo_jax.convert import-hf` outputs or Hugging Face directories.)
"""
from leo_jax.configs import common_train, leo_mini_llama3_8b


def get_config():
    config = leo_mini_llama3_8b.get_config()
    config.mesh.ici.update(data=-1, fsdp=8)  # FSDP inside groups of 8 chips: 8B weights + Adam state fit
    config.model.llm.remat_policy = "full"
    config.data.template = "plain"
    config.data.global_batch_size = 256
    config.train = common_train.get_config()
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 0.0
    config.train.trainable = ("projector/.*",)
    config.train.checkpoint_every = 500
    return config
