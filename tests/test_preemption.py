"""A run stopped by SIGTERM and damaged checkpoints, through the command line on the tiny config (1 process; 2
processes: test_multihost.py).

The preempted run resumes the session's uninterrupted run (conftest's `trained_workdir`) from its checkpoint of
epoch 2 and saves every 5 steps (`train.checkpoint_every_steps`) beside the epochs' checkpoints; SIGTERM comes once
epoch 3 starts, so the run stops mid-epoch 3; run again, it is stopped by SIGTERM in the evaluation after epoch 3;
run again, it evaluates and ends with the uninterrupted run's parameters.  The damaged-checkpoint tests start from
copies of it.
"""

import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest
from helpers import REPO, load_config, main_command, run_main, sigterm_when, subprocess_env
from jax.sharding import Mesh

from unimmad_jax import sharding, weights
from unimmad_jax.preemption import EXIT_STATUS

STEPS_PER_EPOCH = 96 // 8  # the tiny config's 96 training images, batches of 8
SAVED = 2 * STEPS_PER_EPOCH  # the uninterrupted run's checkpoint that the preempted run resumes
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


class PreemptedRun(NamedTuple):
    workdir: Path
    stopped: int  # the step of the stop mid-epoch 3
    in_evaluation: str  # the output of the run stopped in the final evaluation
    checkpoints_in_evaluation: list[int]  # the checkpoints it left
    evaluated_in_evaluation: bool  # whether it left evaluation results
    last: str  # the output of the run that evaluated and calibrated


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, trained_workdir, synthetic_data_dir) -> PreemptedRun:
    """The uninterrupted run's checkpoint of epoch 2 run on: stopped by SIGTERM mid-epoch 3, run again and stopped
    by SIGTERM in the final evaluation, run again to its end.  Epochs 1 and 2 would be the uninterrupted run's
    again, and one run stopped twice spares a run of its own for the stop in an evaluation."""
    workdir = tmp_path_factory.mktemp("preempted")
    log = workdir.parent / "log"
    shutil.copytree(trained_workdir / "checkpoints" / str(SAVED), workdir / "checkpoints" / str(SAVED))
    command = main_command(workdir, synthetic_data_dir, **EVERY_STEPS)
    code, output = preempted(command, lambda: "epoch 3/3" in log.read_text(), log)
    assert code == EXIT_STATUS, output[-3000:]
    stopped = int(STOPPED.search(output)[1])
    # The notice comes as epoch 3 starts: the run stops at one of its steps, after the step checkpoint at 25 (or
    # there) and before the next one.
    assert 25 <= stopped < 30 and checkpoint_steps(workdir) == sorted({SAVED, 25, stopped})
    assert "run the same command again to resume" in output
    code, in_evaluation = preempted(command, lambda: "eval synthetic" in log.read_text(), log)
    assert code == EXIT_STATUS, in_evaluation[-3000:]
    assert f"Resumed from step {stopped} " in in_evaluation
    checkpoints, evaluated = checkpoint_steps(workdir), (workdir / "eval").exists()
    return PreemptedRun(
        workdir, stopped, in_evaluation, checkpoints, evaluated, run_main(workdir, synthetic_data_dir, **EVERY_STEPS)
    )


def test_sigterm_mid_epoch_saves_and_the_resumed_run_ends_with_identical_parameters(
    preempted_run, trained_workdir, synthetic_data_dir
):
    # keep_checkpoints=3 counts the step checkpoints too (every 5 steps, and the epochs' ends 12, 24, 36)
    assert checkpoint_steps(preempted_run.workdir) == [30, 35, 36]
    assert_same_params(preempted_run.workdir, trained_workdir, synthetic_data_dir)


def test_sigterm_during_an_evaluation_stops_it_and_the_resumed_run_evaluates_again(preempted_run):
    """The second stop of the fixture's run: in the evaluation after epoch 3."""
    workdir, end = preempted_run.workdir, 3 * STEPS_PER_EPOCH
    output = preempted_run.in_evaluation
    assert f"at step {end} (end of epoch 3; the resumed run evaluates it first)" in output
    assert "Evaluation after epoch 3" not in output and not preempted_run.evaluated_in_evaluation
    assert preempted_run.checkpoints_in_evaluation == [30, 35, end]
    assert f"Resumed from step {end} " in preempted_run.last and "Evaluation after epoch 3" in preempted_run.last
    assert (workdir / "eval" / "epoch_0003.json").is_file() and (workdir / "calibration.json").is_file()
    assert checkpoint_steps(workdir) == [30, 35, end]


def copy_of(preempted_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(preempted_run.workdir, workdir)
    return workdir


def test_training_moves_a_truncated_latest_checkpoint_aside_and_resumes_from_the_previous(
    preempted_run, trained_workdir, synthetic_data_dir, tmp_path
):
    workdir = copy_of(preempted_run, tmp_path)
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
    preempted_run, synthetic_data_dir, tmp_path
):
    workdir = copy_of(preempted_run, tmp_path)
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
    preempted_run, synthetic_data_dir, tmp_path
):
    workdir = copy_of(preempted_run, tmp_path)
    result = run(workdir, synthetic_data_dir, **{"model.planes": "(4,8,32)"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"checkpoint {workdir / 'checkpoints' / '36'} does not fit the configured model" in result.stderr
    assert "params/encoder/layer3_0/bn1/bias: (32,) in the checkpoint, (64,) configured" in result.stderr
    assert checkpoint_steps(workdir) == [30, 35, 36] and not (workdir / "checkpoints_damaged").exists()


def test_no_readable_checkpoint_is_an_error_naming_the_folder(preempted_run, synthetic_data_dir, tmp_path):
    workdir = copy_of(preempted_run, tmp_path)
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
