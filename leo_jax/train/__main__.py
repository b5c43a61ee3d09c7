"""`python -m leo_jax.train --config configs/<preset>.py --workdir DIR [--config.train.steps=100 ...]`

Trains the preset's model on its data (resuming from DIR/checkpoints when there are checkpoints), logs to
DIR/metrics.jsonl and DIR/tensorboard, evaluates on data.eval_files and saves checkpoints in DIR/checkpoints.
With the built-in synthetic set (data.train_files under DIR/synthetic, see configs/tiny_leo_mini_train.py) the set
is generated first if absent.
"""

from __future__ import annotations

import argparse
import logging
import sys

from leo_jax.config import parse_cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m leo_jax.train",
                                     description="Train a LEO / LEO-MINI / LLM preset; rerun it to resume.",
                                     epilog="Any config field can be overridden: --config.train.learning_rate=1e-4, "
                                            "--config.data.global_batch_size=64, --config.mesh.ici.fsdp=4 ...")
    parser.add_argument("--config", required=True, help="preset name or path to a config .py (optionally :arg)")
    parser.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and TensorBoard logs")
    config, args = parse_cli(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from leo_jax.data.pipeline import DataSkipLimitError
    from leo_jax.train.loop import NonFiniteLossError, train
    from leo_jax.train.synthetic_data import ensure_synthetic_data

    try:
        ensure_synthetic_data(config, args.workdir)
        train(config, args.workdir)
    except NonFiniteLossError as e:
        logging.getLogger("leo_jax.train").error("%s", e)
        return 3
    except (ValueError, FileNotFoundError, DataSkipLimitError) as e:  # bad config or input; the message says the fix
        logging.getLogger("leo_jax.train").error("%s: %s", type(e).__name__, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
