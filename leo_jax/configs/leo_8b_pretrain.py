"""LEO-8B projector pre-training: both projectors train on the LLaVA-1.5 pretrain set (image-caption
pairs, template 'plain'); InternViT, SAM and InternLM2 are frozen. LEO does not state this stage's hyper-parameters;
these are LLaVA-1.5's: lr 1e-3, cosine, 3% warm-up, weight decay 0, batch 256, 1 epoch.

    python -m leo_jax.train --config leo_8b_pretrain --workdir DIR \\
      --config.data.train_files=... --config.data.tokenizer=/ckpt/internlm2_chat_7b \\
      --config.train.init="{'llm': '/ckpt/internlm2_chat_7b', 'intern_vit': '/ckpt/internvit_300m', 'sam': '/ckpt/sam'}"
"""
from leo_jax.configs import common_train, leo_8b


def get_config():
    config = leo_8b.get_config()
    config.mesh.ici.update(data=-1, fsdp=8)
    config.model.llm.remat_policy = "full"
    config.data.template = "plain"
    config.data.global_batch_size = 256
    config.train = common_train.get_config()
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 0.0
    config.train.trainable = ("projector_intern/.*", "projector_sam/.*")
    return config
