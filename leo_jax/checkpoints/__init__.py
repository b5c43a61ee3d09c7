"""Reading and writing leo_jax checkpoints: the trainer's step directories (`training`) and the converted-model
format that `convert import-hf` writes (`converted`). Below both `train/` and `convert/`, so generation, evaluation
and conversion read checkpoints without importing the trainer."""

from leo_jax.checkpoints.converted import META_FILE, load_leo_params, read_leo_meta, save_leo_checkpoint
from leo_jax.checkpoints.training import find_checkpoint, load_trained, load_training_params

__all__ = ["META_FILE", "find_checkpoint", "load_leo_params", "load_trained", "load_training_params",
           "read_leo_meta", "save_leo_checkpoint"]
