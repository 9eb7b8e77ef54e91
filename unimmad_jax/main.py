"""The UniMMAD program: train, evaluate or predict, configured by an ml_collections config file.

    python -m unimmad_jax.main --config=configs/unified.py --workdir=runs/unified
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=calibrate
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=predict \\
        --config.predict.input=path/to/images

Any config field can be overridden, e.g. `--config.train.batch_size=32`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string(
    "workdir", None, "Checkpoints, evaluation tables, predictions and TensorBoard logs go here.", required=True
)
flags.DEFINE_enum("mode", "train", ["train", "eval", "calibrate", "predict"], "What to run.")
flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (automatic when JAX_COORDINATOR_ADDRESS is set)."
)
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
FLAGS = flags.FLAGS


def run(argv) -> int:
    del argv
    from unimmad_jax import calibrate, checkpoints, evaluate, loop, predict, sharding
    from unimmad_jax.config import model_config
    from unimmad_jax.data import InvalidDataError, ensure_prepared
    from unimmad_jax.models.unimmad import UniMMAD

    if not FLAGS["verbosity"].present:  # orbax and grain log every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    sharding.initialize_distributed(FLAGS.multihost)
    try:
        if FLAGS.mode == "train":
            loop.train_and_evaluate(config, FLAGS.workdir)
            return 0
        mesh = sharding.data_mesh()
        variables = checkpoints.trained_variables(config, FLAGS.workdir, mesh)
        model = UniMMAD(model_config(config))
        if FLAGS.mode == "eval":
            ensure_prepared(config.data.datasets, config.data.data_dir)
            summary = evaluate.evaluate(model, variables, config, mesh)
            print(evaluate.metrics.to_text(summary))
            path = evaluate.write_summary(summary, f"{FLAGS.workdir}/eval", "final")
            print(f"wrote {path} and its .md")
        elif FLAGS.mode == "calibrate":
            ensure_prepared(config.data.datasets, config.data.data_dir)
            latest = checkpoints.latest_record(FLAGS.workdir)  # None: the variables of train.init_from
            step = latest[0] if latest else None
            calibrate.calibrate_workdir(model, variables, config, FLAGS.workdir, mesh, step)
        else:
            predict.predict(model, variables, config, FLAGS.workdir)
    except (InvalidDataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main():
    app.run(lambda argv: sys.exit(run(argv)))


if __name__ == "__main__":
    main()
