"""Research protocols on the tiny config: a continual sequence killed and resumed, forgetting, unified vs separate."""

import json
import re
import subprocess

import jax
import numpy as np
import pytest
from helpers import REPO, load_config, logged_step, main_command, run_main, sigterm_when, subprocess_env

from unimmad_jax import loop, protocols, sharding, weights
from unimmad_jax.config import model_config
from unimmad_jax.data import InvalidDataError
from unimmad_jax.models.unimmad import UniMMAD
from unimmad_jax.preemption import EXIT_STATUS

TASKS = '(("synthetic:tiles",),("synthetic:brain_scan",))'
EPOCHS = 1
"""Of every protocol run here: the continual tasks compile the training steps that the separate runs reuse (a
run's schedule, and so its compiled step, depends on `train.num_epochs`)."""
STEPS_PER_TASK = EPOCHS * 48 // 8  # 48 training images in batches of 8
STOP_AFTER_STEP = 2
"""The continual run is stopped once task 2 has logged this step (every step logged): mid-epoch, with steps to
spare before the epoch's end."""


def tiny_protocol_config(data_dir, tasks):
    config = load_config("tiny")
    config.data.data_dir = str(data_dir)
    config.continual.tasks = tasks
    config.train.num_epochs = 2
    return config


def test_forgetting_of_a_hand_made_matrix():
    matrix = np.array([[0.9, 0.5, 0.4], [0.8, 0.95, 0.6], [0.7, 0.85, 0.9]])
    # task 1: best 0.9 (after task 1), last 0.7; task 2: best 0.95, last 0.85
    np.testing.assert_allclose(protocols.forgetting(matrix), [0.2, 0.1])


def test_forgetting_ignores_the_scores_before_a_task_was_trained():
    # task 2 scores 0.9 zero-shot after task 1, its best once trained is 0.8 (after task 2)
    matrix = np.array([[0.7, 0.9, 0.5, 0.6], [0.6, 0.8, 0.95, 0.7], [0.75, 0.7, 0.9, 0.9], [0.65, 0.6, 0.85, 0.95]])
    # task 1: max(0.7, 0.6, 0.75) - 0.65; task 2: max(0.8, 0.7) - 0.6 (over every row: 0.9 - 0.6);
    # task 3: 0.9 - 0.85 (over every row: 0.95 - 0.85)
    np.testing.assert_allclose(protocols.forgetting(matrix), [0.1, 0.2, 0.05], atol=1e-12)


def test_tasks_name_the_selection_at_fault(synthetic_data_dir):
    config = tiny_protocol_config(synthetic_data_dir, (("synthetic:tiles",), ("synthetic:tiles,teapot",)))
    with pytest.raises(InvalidDataError, match=r"continual.tasks\[1\] selects \['teapot'\] of synthetic"):
        protocols.parse_tasks(config)
    config.continual.tasks = (("synthetic:tiles,plate", "synthetic:tiles"), ("synthetic",))
    first, everything = protocols.parse_tasks(config)
    assert first.classes == {"synthetic": ("tiles", "plate")}
    assert set(everything.classes["synthetic"]) == {"tiles", "plate", "foam", "brain_scan", "lung_scan"}
    assert protocols.replay_classes([first], everything) == {}
    assert protocols.replay_classes([everything], first) == {"synthetic": ("foam", "brain_scan", "lung_scan")}


@pytest.fixture(scope="module")
def continual_workdir(tmp_path_factory, synthetic_data_dir):
    """A 2-task sequence stopped by SIGTERM in the middle of task 2's epoch (exit status 143), then run again to the
    end."""
    workdir = tmp_path_factory.mktemp("continual")
    fields = {"continual.tasks": TASKS, "train.num_epochs": EPOCHS, "train.log_every_steps": 1}
    command = main_command(workdir, synthetic_data_dir, "--mode=continual", **fields)
    with (workdir.parent / f"{workdir.name}.log").open("w+") as log:
        process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            sigterm_when([process], logged_step(workdir / "continual" / "task_2", STOP_AFTER_STEP), [0])
            process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
        log.seek(0)
        stopped_output = log.read()
    assert process.returncode == EXIT_STATUS, stopped_output[-3000:]
    stopped = int(re.search(r"Stopped by a preemption notice at step (\d+) ", stopped_output)[1])
    assert STOP_AFTER_STEP <= stopped < STEPS_PER_TASK
    assert not (workdir / "continual" / "results.json").exists()
    task_1_log = (workdir / "continual" / "task_1" / "metrics.jsonl").read_text()

    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Resumed from step {stopped} " in result.stdout
    assert result.stdout.count("Resumed from step") == 1  # task 1 was complete: neither trained nor resumed
    assert (workdir / "continual" / "task_1" / "metrics.jsonl").read_text() == task_1_log
    return workdir


def test_continual_results_and_forgetting(continual_workdir):
    root = continual_workdir / "continual"
    results = json.loads((root / "results.json").read_text())
    assert results["tasks"] == [["synthetic:tiles"], ["synthetic:brain_scan"]]
    for metric in ("i_auroc", "p_auroc", "aupro_0.3"):
        matrix = np.array(results["matrix"][metric])
        assert matrix.shape == (2, 2) and np.all((matrix >= 0) & (matrix <= 1))
        assert results["forgetting"][metric] == pytest.approx([matrix[0, 0] - matrix[1, 0]])
        assert results["final_average"][metric] == pytest.approx(matrix[1].mean())
        # each row is the evaluation written by its task's run
        for i in range(2):
            row = json.loads((root / f"task_{i + 1}" / "protocol_evaluation.json").read_text())["values"][metric]
            assert row == pytest.approx(matrix[i])
    assert "| forgetting |" in (root / "results.md").read_text()
    assert (root / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (root / "task_2" / "checkpoints").iterdir() if p.name.isdigit())[-1] == (
        STEPS_PER_TASK
    )


def test_a_task_starts_from_the_previous_ones_weights_with_a_fresh_optimizer(
    continual_workdir, synthetic_data_dir, tmp_path
):
    config = tiny_protocol_config(synthetic_data_dir, ())
    config.train.init_from = str(continual_workdir / "continual" / "task_1")
    model = UniMMAD(model_config(config))
    mesh = sharding.data_mesh()
    state = loop.initial_state(model, config, 6, mesh, tmp_path)
    trained = weights.evaluated_variables(config, config.train.init_from, mesh)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(trained["params"])):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(m)) for m in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(m) > 0)
    with pytest.raises(ValueError, match="train.init_from=.* is the workdir itself"):
        loop.train_and_evaluate(config, config.train.init_from)


def test_unified_vs_separate(tmp_path, synthetic_data_dir):
    run_main(
        tmp_path,
        synthetic_data_dir,
        "--mode=unified_vs_separate",
        **{"continual.tasks": TASKS, "train.num_epochs": EPOCHS},
    )
    root = tmp_path / "unified_vs_separate"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["separate_1", "separate_2", "unified"]
    results = json.loads((root / "results.json").read_text())
    unified = json.loads((root / "unified" / "protocol_evaluation.json").read_text())["values"]
    for j, row in enumerate(results["tasks"]):
        separate = json.loads((root / f"separate_{j + 1}" / "protocol_evaluation.json").read_text())["values"]
        for metric in protocols.PROTOCOL_METRICS:
            assert row[metric]["unified"] == unified[metric][j]
            assert row[metric]["difference"] == pytest.approx(unified[metric][j] - separate[metric][0])
    assert "synthetic:brain_scan" in (root / "results.md").read_text()
