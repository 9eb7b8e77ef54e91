"""The UniMMAD program: train, evaluate or predict, configured by an ml_collections config file.

    python -m unimmad_jax.main --config=configs/unified.py --workdir=runs/unified
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=calibrate
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo --mode=predict \\
        --config.predict.input=path/to/images
    python -m unimmad_jax.main --config=configs/continual_demo.py --workdir=runs/continual --mode=continual
    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/sweep --mode=sweep --config.sweep.seeds='(0,1,2)'

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
    ["train", "eval", "calibrate", "predict", "continual", "unified_vs_separate", "sweep"],
    "What to run; continual and unified_vs_separate train the task lists of config.continual (protocols.py), "
    "sweep trains the config once per seed of config.sweep.seeds (sweep.py).",
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
SOME_INPUTS_FAILED = 3
"""The exit status of a prediction that scored some of its inputs and could not read the others."""


def use_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` for every compile of this process (JAX's defaults
    skip compiles under a second); process 0 writes the entries, every process reads them."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


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
        sweep,
        weights,
    )
    from unimmad_jax.config import model_config
    from unimmad_jax.data import InvalidDataError, ensure_prepared
    from unimmad_jax.models.unimmad import UniMMAD

    if not FLAGS["verbosity"].present:  # orbax and grain log every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    if config.compilation_cache_dir:
        use_compilation_cache(config.compilation_cache_dir)
    sharding.initialize_distributed(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    workdir = checkpoints.workdir_path(FLAGS.workdir)
    trainings = {
        "train": loop.train_and_evaluate,
        "continual": protocols.run_continual,
        "unified_vs_separate": protocols.run_unified_vs_separate,
        "sweep": sweep.run_sweep,
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
            subsets = evaluate.modality_subsets(config)
            summary = evaluate.evaluate(model, variables, config, mesh)
            summary["paper"] = report.compare_with_paper(summary)
            if sharding.is_main_process():
                print(report.summary_text(summary))
                path = report.write_summary(summary, workdir / "eval", "final")
                print(f"wrote {path} and its .md")
            if subsets:
                table = evaluate.evaluate_modality_subsets(model, variables, config, mesh, subsets)
                if sharding.is_main_process():
                    print(report.modality_subsets_text(table))
                    markdown = report.modality_subsets_markdown(table)
                    path = report.write_tables(table, markdown, workdir / "eval", "modality_subsets")
                    print(f"wrote {path} and its .md")
        elif FLAGS.mode == "calibrate":
            ensure_prepared(config.data.datasets, config.data.data_dir)
            calibrate.calibrate_workdir(model, variables, config, workdir, mesh, step)
        elif predict.predict(model, variables, config, workdir, step).failed:
            return SOME_INPUTS_FAILED
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
