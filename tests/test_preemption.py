"""A run stopped by SIGTERM and damaged checkpoints, through the command line on the tiny config (1 process; 2
processes: test_multihost.py).

The preempted run saves every 5 steps (`train.checkpoint_every_steps`) beside the epochs' checkpoints; SIGTERM
comes once step 5 is logged, so the run stops mid-epoch 1.  Run again, it ends with the parameters of the session's
uninterrupted run (conftest's `trained_workdir`), and the damaged-checkpoint tests start from copies of it.
"""

import re
import shutil
import subprocess

import jax
import numpy as np
import pytest
from helpers import REPO, load_config, logged_step, main_command, run_main, sigterm_when, subprocess_env
from jax.sharding import Mesh

from unimmad_jax import sharding, weights
from unimmad_jax.preemption import EXIT_STATUS

STEPS_PER_EPOCH = 96 // 8  # the tiny config's 96 training images, batches of 8
EVERY_STEPS = {"train.checkpoint_every_steps": 5}
STOPPED = re.compile(r"Stopped by a preemption notice at step (\d+)")


def preempted(command: list[str], ready, output) -> tuple[int, str]:
    """(exit status, output) of `command`, sent SIGTERM as soon as `ready()`."""
    with output.open("w+") as f:
        process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            sigterm_when([process], ready, [0])
            process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
        f.seek(0)
        return process.returncode, f.read()


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def final_params(workdir, data_dir):
    config = load_config("tiny")
    config.data.data_dir = str(data_dir)
    return weights.evaluated_variables(config, workdir, Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,)))


def assert_same_params(workdir, expected_workdir, data_dir):
    expected, resumed = final_params(expected_workdir, data_dir), final_params(workdir, data_dir)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def run(workdir, data_dir, *args, **fields) -> subprocess.CompletedProcess:
    return subprocess.run(
        main_command(workdir, data_dir, *args, **fields), cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def resumed_workdir(tmp_path_factory, synthetic_data_dir):
    """The run stopped by SIGTERM mid-epoch 1 and run again to its end: the workdir and the step it stopped at."""
    workdir = tmp_path_factory.mktemp("preempted")
    code, output = preempted(
        main_command(workdir, synthetic_data_dir, **EVERY_STEPS), logged_step(workdir, 5), workdir.parent / "log"
    )
    assert code == EXIT_STATUS, output[-3000:]
    stopped = int(STOPPED.search(output)[1])
    # The notice comes once step 5 is logged, with the run in the middle of epoch 1.
    assert 5 <= stopped < STEPS_PER_EPOCH and checkpoint_steps(workdir) == sorted({5, stopped})
    assert "run the same command again to resume" in output
    resumed = run_main(workdir, synthetic_data_dir, **EVERY_STEPS)
    assert f"Resumed from step {stopped} " in resumed
    return workdir, stopped


def test_sigterm_mid_epoch_saves_and_the_resumed_run_ends_with_identical_parameters(
    resumed_workdir, trained_workdir, synthetic_data_dir
):
    workdir, _ = resumed_workdir
    # keep_checkpoints=3 counts the step checkpoints too (every 5 steps, and the epochs' ends 12, 24, 36)
    assert checkpoint_steps(workdir) == [30, 35, 36]
    assert_same_params(workdir, trained_workdir, synthetic_data_dir)


def test_sigterm_during_an_evaluation_stops_it_and_the_resumed_run_evaluates_again(synthetic_data_dir, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "log"
    one_epoch = {"train.num_epochs": 1}
    code, output = preempted(
        main_command(workdir, synthetic_data_dir, **one_epoch), lambda: "eval synthetic" in log.read_text(), log
    )
    assert code == EXIT_STATUS, output[-3000:]
    assert f"at step {STEPS_PER_EPOCH} (end of epoch 1; the resumed run evaluates it first)" in output
    assert "Evaluation after epoch 1" not in output and not (workdir / "eval").exists()
    assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH]
    resumed = run_main(workdir, synthetic_data_dir, **one_epoch)
    assert f"Resumed from step {STEPS_PER_EPOCH} " in resumed and "Evaluation after epoch 1" in resumed
    assert (workdir / "eval" / "epoch_0001.json").is_file() and (workdir / "calibration.json").is_file()
    assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH]


def copy_of(resumed_workdir, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(resumed_workdir[0], workdir)
    return workdir


def test_training_moves_a_truncated_latest_checkpoint_aside_and_resumes_from_the_previous(
    resumed_workdir, trained_workdir, synthetic_data_dir, tmp_path
):
    workdir = copy_of(resumed_workdir, tmp_path)
    data_files = sorted((workdir / "checkpoints" / "36" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    with data_files[-1].open("r+b") as f:
        f.truncate(100)
    result = run(workdir, synthetic_data_dir, **EVERY_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint step 36 cannot be read" in result.stderr and "using step 35" in result.stderr
    assert f"moved the damaged checkpoint step 36 to {workdir / 'checkpoints_damaged' / '36'}" in result.stderr
    assert "Resumed from step 35 " in result.stdout
    assert (workdir / "checkpoints_damaged" / "36" / "state").is_dir()
    assert checkpoint_steps(workdir) == [30, 35, 36]
    assert_same_params(workdir, trained_workdir, synthetic_data_dir)


def test_eval_and_predict_step_over_a_damaged_latest_checkpoint_without_moving_it(
    resumed_workdir, synthetic_data_dir, tmp_path
):
    workdir = copy_of(resumed_workdir, tmp_path)
    (workdir / "checkpoints" / "36" / "state" / "_METADATA").unlink()
    result = run(workdir, synthetic_data_dir, "--mode=eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint step 36 cannot be read" in result.stderr and "using step 35" in result.stderr
    assert (workdir / "eval" / "final.json").is_file()
    assert checkpoint_steps(workdir) == [30, 35, 36] and not (workdir / "checkpoints_damaged").exists()
    # calibration.json calibrates step 36: predict with step 35 says there is none for it
    result = run(workdir, synthetic_data_dir, "--mode=predict", **{"predict.input": "synthetic:test"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "calibrates checkpoint step 36 but the checkpoint in use is step 35, which has no calibration" in (
        result.stderr
    )


def test_a_checkpoint_of_another_config_is_an_error_naming_the_fields_and_stays(
    resumed_workdir, synthetic_data_dir, tmp_path
):
    workdir = copy_of(resumed_workdir, tmp_path)
    result = run(workdir, synthetic_data_dir, **{"model.planes": "(4,8,32)"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"checkpoint {workdir / 'checkpoints' / '36'} does not fit the configured model" in result.stderr
    assert "params/encoder/layer3_0/bn1/bias: (32,) in the checkpoint, (64,) configured" in result.stderr
    assert checkpoint_steps(workdir) == [30, 35, 36] and not (workdir / "checkpoints_damaged").exists()


def test_no_readable_checkpoint_is_an_error_naming_the_folder(resumed_workdir, synthetic_data_dir, tmp_path):
    workdir = copy_of(resumed_workdir, tmp_path)
    for step in (30, 35, 36):
        (workdir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    result = run(workdir, synthetic_data_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"no checkpoint in {workdir / 'checkpoints'} can be read" in result.stderr
    assert checkpoint_steps(workdir) == [30, 35, 36] and not (workdir / "checkpoints_damaged").exists()


def test_non_finite_values_stop_the_run_before_any_checkpoint_is_written(synthetic_data_dir, tmp_path):
    """A learning rate that overflows the parameters; no step logs before the first save (step 3)."""
    workdir = tmp_path / "diverged"
    fields = {"optimizer.learning_rate": 1e30, "train.log_every_steps": 1000, "train.checkpoint_every_steps": 3}
    result = run(workdir, synthetic_data_dir, **fields)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: non-finite values in the train state or loss at step 3 (in epoch 1): not saved" in result.stderr
    assert checkpoint_steps(workdir) == []
