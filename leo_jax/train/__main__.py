"""`python -m leo_jax.train --config <preset> --workdir DIR [--config.train.steps=100 ...]`

Trains the preset's model on its data (resuming from DIR/checkpoints when there are checkpoints), logs to
DIR/metrics.jsonl and DIR/tensorboard, evaluates on data.eval_files and saves checkpoints in DIR/checkpoints.
With the built-in synthetic set (data.train_files under DIR/synthetic, see the tiny_leo_mini_train preset) the set is
generated first if absent, unless --config.data.train_files is given.
Exit status: 0 done (or stopped by SIGTERM with a checkpoint), 2 bad config or input, 3 non-finite loss or
parameters, 4 storage, workdir lock or unreadable checkpoint.
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
    group = parser.add_argument_group(
        "multi-process start (one process per host)",
        "Without these flags: the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
        "JAX_PROCESS_ID, else JAX's cluster detection (Cloud TPU VM, GKE, SLURM, Open MPI), else one process.")
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0's coordinator service")
    group.add_argument("--num_processes", type=int, help="number of processes in the job")
    group.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes-1")
    group.add_argument("--distributed_timeout", type=int, default=300,
                       help="seconds to wait for every process to join before failing (default 300)")
    config, args = parse_cli(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from leo_jax.train import cpu_process, distributed

    cpu_process.run_computations_inline()  # before the backend starts; CPU only (module doc)
    try:  # before any JAX backend call: jax.distributed must start first
        distributed.initialize(distributed.resolve_process_group(args.coordinator_address, args.num_processes,
                                                                 args.process_id), args.distributed_timeout)
    except distributed.DistributedStartError as e:
        logging.getLogger("leo_jax.train").error("%s", e)
        return 2
    logging.getLogger("leo_jax.train").info("%s", distributed.describe())
    import jax

    cpu_process.keep_freed_memory()  # on CPU only
    if jax.process_index() != 0:  # one log for the job: the other processes report warnings and errors only
        logging.getLogger("leo_jax").setLevel(logging.WARNING)

    from leo_jax.data.pipeline import DataSkipLimitError
    from leo_jax.train.checkpoint import CheckpointReadError
    from leo_jax.train.loop import NonFiniteLossError, train
    from leo_jax.train.workdir import StorageError, WorkdirLockedError

    log = logging.getLogger("leo_jax.train")
    try:
        train(config, args.workdir)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 3
    except (StorageError, WorkdirLockedError, CheckpointReadError) as e:  # the workdir or its storage
        log.error("%s: %s", type(e).__name__, e)
        return 4
    except (ValueError, FileNotFoundError, DataSkipLimitError) as e:  # bad config or input; the message says the fix
        log.error("%s: %s", type(e).__name__, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
