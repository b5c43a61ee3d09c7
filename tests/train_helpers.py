"""Small training set-ups for the trainer tests: a tiny LLM on a text-only LLaVA-format set (fast to compile)."""

from __future__ import annotations

import json
import os

import numpy as np

from leo_jax.configs import common_data, common_train, tiny_llm
from leo_jax.data import synthetic
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH


def write_text_set(path: str, num: int = 64, seed: int = 0) -> str:
    """'what is a plus b?' -> the number word, in LLaVA JSON (text-only records)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num):
        a, b = (int(x) for x in rng.integers(0, 5, size=2))
        question = synthetic.QUESTION_TEMPLATES["sum"].format(a=synthetic.NUMBER_WORDS[a], b=synthetic.NUMBER_WORDS[b])
        records.append({"id": f"text-{i}", "question_type": "sum", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": synthetic.NUMBER_WORDS[a + b]}]})
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def llm_train_config(workdir: str, **train):
    """Tiny Llama-style LLM + text set + trainer defaults (6 steps, no eval), overridable per test."""
    config = tiny_llm.get_config()
    config.model.vocab_size = 576  # the synthetic tokenizer has 541 ids
    config.data = common_data.get_config()
    os.makedirs(workdir, exist_ok=True)
    config.data.train_files = write_text_set(os.path.join(workdir, "text.json"))
    config.data.tokenizer = SYNTHETIC_TOKENIZER_PATH
    config.data.template = "llama3"
    config.data.seq_len = 32
    config.data.global_batch_size = 8
    config.data.eval_batch_size = 8
    config.data.num_epochs = None
    config.train = common_train.get_config()
    config.train.update(steps=6, learning_rate=1e-2, warmup_fraction=0.2, log_every=1, checkpoint_every=3,
                        eval_at_end=False, async_checkpoint=True)
    config.train.update(train)
    return config


def config_file(path: str, workdir: str, **train) -> str:
    """A config .py (for subprocess runs of `python -m leo_jax.train`) building llm_train_config(workdir)."""
    with open(path, "w") as f:
        f.write("import train_helpers  # importable: the tests put tests/ on PYTHONPATH\n\n\n"
                "def get_config():\n"
                f"    return train_helpers.llm_train_config({workdir!r}, **{train!r})\n")
    return path


def save_step0_checkpoint(config, workdir: str) -> str:
    """Saves the freshly initialised train state of `config` as the trainer saves a step (step 0, data state
    included), so `workdir` loads as a training workdir; returns workdir."""
    from leo_jax.train.loop import Trainer

    trainer = Trainer(config, workdir)
    trainer.setup()
    trainer.checkpointer.save(0, trainer.state, trainer.data_state(trainer.iterator.get_state()),
                              trainer.config.to_dict(), force=True)
    trainer.close()
    return workdir
