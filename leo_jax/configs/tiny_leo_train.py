"""Tiny LEO trained on the built-in synthetic visual-QA set on CPU (like leo_jax/configs/tiny_leo_mini_train.py):

    python -m leo_jax.train --config tiny_leo_train --workdir /tmp/leo_run

Everything trains (the tiny encoders start from random weights). Two-image questions (10% of the training set, a
sixth of the validation set) take one tile per image, so they fit the 2 tile slots per row.
"""
from leo_jax.configs import common_train, tiny_leo, tiny_leo_mini_train


def get_config():
    config = tiny_leo.get_config()
    # Two more questions about the same image in every question sample: they fill the rows (the step costs
    # the same) and triple the supervision per image (measured at 2000 steps: exists 0.51 -> 0.75, colour 0.57 ->
    # 0.72).
    config.synthetic = tiny_leo_mini_train.synthetic_section(follow_ups=2)
    config.model.llm.initializer_range = 0.1  # trained from scratch (see leo_jax/configs/tiny_leo_mini_train.py)
    config.model.intern_vit.position_initializer_range = 0.3  # layout in the tokens' content (same reason)
    config.data.num_epochs = None
    config.data.eval_batch_size = 50
    config.train = common_train.get_config()
    config.train.steps = 2000
    config.train.learning_rate = 5e-4  # 2e-3 and 1e-3 plateau at the answer prior (measured)
    config.train.warmup_fraction = 0.05
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    config.train.eval_max_new_tokens = 4
    return config
