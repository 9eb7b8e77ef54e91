"""The UniMMAD program: train, evaluate or predict, configured by an ml_collections config file.

    python -m unimmad_jax.main --config=configs/unified.py --workdir=runs/unified
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=calibrate
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=predict \\
        --config.predict.input=path/to/images
    python -m unimmad_jax.main --config=configs/continual_demo.py --workdir=runs/continual --mode=continual

Any config field can be overridden, e.g. `--config.train.batch_size=32`.  Several processes (a TPU
pod, one process per GPU, or CPU processes) run the same command; on clusters that JAX detects
(TPU pods, SLURM, Open MPI) with `--multihost`, elsewhere with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.  The workdir may be `gs://...`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string(
    "workdir", None, "Checkpoints, evaluation tables, predictions and TensorBoard logs go here.", required=True
)
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "calibrate", "predict", "continual", "unified_vs_separate"],
    "What to run; continual and unified_vs_separate train the task lists of config.continual (protocols.py).",
)
flags.DEFINE_bool(
    "multihost",
    False,
    "Join the other processes with jax.distributed.initialize(), detecting the cluster (TPU pod, SLURM, "
    "Open MPI); automatic when JAX_COORDINATOR_ADDRESS is set or a coordinator flag is given.",
)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for clusters JAX cannot detect.")
flags.DEFINE_integer("num_processes", None, "Processes of the run (with --coordinator_address).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).", lower_bound=0)
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
FLAGS = flags.FLAGS


def run(argv) -> int:
    del argv
    from unimmad_jax import (
        calibrate,
        checkpoints,
        evaluate,
        loop,
        predict,
        preemption,
        protocols,
        report,
        sharding,
        weights,
    )
    from unimmad_jax.config import model_config
    from unimmad_jax.data import InvalidDataError, ensure_prepared
    from unimmad_jax.models.unimmad import UniMMAD

    if not FLAGS["verbosity"].present:  # orbax and grain log every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    sharding.initialize_distributed(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    workdir = checkpoints.workdir_path(FLAGS.workdir)
    trainings = {
        "train": loop.train_and_evaluate,
        "continual": protocols.run_continual,
        "unified_vs_separate": protocols.run_unified_vs_separate,
    }
    try:
        if FLAGS.mode in trainings:
            with preemption.sigterm_notice():
                trainings[FLAGS.mode](config, workdir)
            return 0
        mesh = sharding.data_mesh()
        step, variables = weights.evaluated_checkpoint(config, workdir, mesh)  # step None: train.init_from
        model = UniMMAD(model_config(config))
        if FLAGS.mode == "eval":
            ensure_prepared(config.data.datasets, config.data.data_dir)
            summary = evaluate.evaluate(model, variables, config, mesh)
            summary["paper"] = report.compare_with_paper(summary)
            if sharding.is_main_process():
                print(report.summary_text(summary))
                path = report.write_summary(summary, workdir / "eval", "final")
                print(f"wrote {path} and its .md")
        elif FLAGS.mode == "calibrate":
            ensure_prepared(config.data.datasets, config.data.data_dir)
            calibrate.calibrate_workdir(model, variables, config, workdir, mesh, step)
        else:
            predict.predict(model, variables, config, workdir, step)
    except preemption.Preempted:
        return preemption.EXIT_STATUS
    except (InvalidDataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training diverged: not resumable as it is
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main():
    app.run(lambda argv: sys.exit(run(argv)))


if __name__ == "__main__":
    main()
