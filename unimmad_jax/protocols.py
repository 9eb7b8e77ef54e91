"""Research protocols over lists of tasks: continual learning with its forgetting, and unified vs separate models.

A task is a list of selections, each `dataset` (all its classes) or `dataset:class,class,...`,
e.g. `("synthetic_hard:tiles,plate",)`.  `--mode=continual` trains `continual.tasks` one after
the other, each task starting from the previous one's last checkpoint with a fresh optimizer and
schedule (`train.init_from`), and evaluates every task after every task: the matrix R[i, j] of
a metric on task j after training task i (the tasks still to come included, for reference).
`--mode=unified_vs_separate` trains one model on all tasks and one model per task, from scratch.

Each training run has its own workdir under `<workdir>/<protocol>/`, so a killed protocol
resumes where it stopped: at the task and step of its last checkpoint.  No checkpoint is chosen
on test data: every model evaluated is the last of its run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from unimmad_jax import checkpoints, evaluate, loop, report, sharding
from unimmad_jax.config import model_config
from unimmad_jax.data import InvalidDataError, ensure_prepared
from unimmad_jax.data.prepared import open_split
from unimmad_jax.models.unimmad import UniMMAD

PROTOCOL_METRICS = ("i_auroc", "p_auroc", "aupro_0.3")


@dataclasses.dataclass(frozen=True)
class Task:
    """The classes of one task: `{dataset: (class, ...)}`, in the order they were selected."""

    selections: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]

    @property
    def name(self) -> str:
        return " + ".join(self.selections)

    def data_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """`config` training and evaluating on this task's classes alone."""
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.data.datasets = tuple(self.classes)
            config.data.classes = ml_collections.ConfigDict(dict(self.classes))
            config.eval.datasets = ()
        return config


def parse_tasks(config: ml_collections.ConfigDict, field: str = "continual.tasks") -> list[Task]:
    """The tasks of `config.continual.tasks`, every class spelled out and checked against the prepared data."""
    ensure_prepared([s.partition(":")[0] for task in config.continual.tasks for s in task], config.data.data_dir)
    tasks = []
    for t, selections in enumerate(config.continual.tasks):
        if isinstance(selections, str) or not selections:
            raise ValueError(f"{field}[{t}] is {selections!r}; a task is a non-empty list of 'dataset[:class,...]'")
        classes: dict[str, list[str]] = {}
        for selection in selections:
            dataset, _, names = selection.partition(":")
            available = open_split(config.data.data_dir, dataset, "test").index.class_names
            chosen = [c.strip() for c in names.split(",") if c.strip()] or list(dict.fromkeys(available))
            unknown = sorted(set(chosen) - set(available))
            if unknown:
                raise InvalidDataError(
                    f"{field}[{t}] selects {unknown} of {dataset}, which has {sorted(set(available))}"
                )
            classes.setdefault(dataset, [])
            classes[dataset] += [c for c in chosen if c not in classes[dataset]]
        tasks.append(Task(tuple(selections), {d: tuple(c) for d, c in classes.items()}))
    if not tasks:
        raise ValueError(f"{field} is empty: list the tasks, e.g. (('synthetic:tiles',), ('synthetic:foam',))")
    return tasks


def union(tasks: Sequence[Task]) -> Task:
    """All the classes of `tasks` as one task."""
    classes: dict[str, list[str]] = {}
    for task in tasks:
        for dataset, names in task.classes.items():
            classes.setdefault(dataset, [])
            classes[dataset] += [c for c in names if c not in classes[dataset]]
    return Task(tuple(s for task in tasks for s in task.selections), {d: tuple(c) for d, c in classes.items()})


def replay_classes(earlier: Sequence[Task], task: Task) -> dict[str, tuple[str, ...]]:
    """The classes of the `earlier` tasks that `task` does not train on itself."""
    seen = union(earlier).classes
    replayed = {d: tuple(c for c in names if c not in task.classes.get(d, ())) for d, names in seen.items()}
    return {d: names for d, names in replayed.items() if names}


def evaluate_tasks(
    model: UniMMAD, variables: dict, config: ml_collections.ConfigDict, tasks: Sequence[Task], mesh: Mesh
) -> dict[str, list[float]]:
    """`{metric: [value on each task]}`: a task's value is the mean over its classes.

    Every class of every task is evaluated once, with one compiled evaluation step."""
    everything = union(tasks)
    eval_config = everything.data_config(config)
    score_fn = evaluate.make_score_fn(model, mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    per_class = {
        dataset: evaluate.evaluate_dataset(score_fn, variables, eval_config, dataset, mesh)
        for dataset in everything.classes
    }
    return {
        metric: [
            float(np.mean([per_class[d][c][metric] for d, names in task.classes.items() for c in names]))
            for task in tasks
        ]
        for metric in PROTOCOL_METRICS
    }


def train_task(config: ml_collections.ConfigDict, task: Task, workdir: epath.Path, init_from: str, replay: dict):
    """Train (or resume) one run on `task` in `workdir`; returns its last variables."""
    task_config = task.data_config(config)
    with task_config.unlocked():
        task_config.train.init_from = init_from
        task_config.data.replay_classes = ml_collections.ConfigDict(replay)
        task_config.data.replay_per_class = config.continual.replay_per_class
    state = loop.train_and_evaluate(task_config, workdir)
    return {"params": state.params, "batch_stats": state.batch_stats}


def _evaluated_run(config, task: Task, workdir: epath.Path, init_from: str, replay: dict, tasks: list[Task]) -> dict:
    """`{metric: [value on each of tasks]}` of the run on `task` in `workdir`, training it first unless done."""
    record = workdir / "protocol_evaluation.json"
    if record.exists():
        return json.loads(record.read_text())["values"]
    variables = train_task(config, task, workdir, init_from, replay)
    model = UniMMAD(model_config(config))
    values = evaluate_tasks(model, variables, config, tasks, sharding.data_mesh())
    if sharding.is_main_process():  # written last: its presence means the run is complete
        record.write_text(json.dumps({"tasks": [t.name for t in tasks], "values": values}, indent=1))
    return values


def forgetting(matrix: np.ndarray) -> np.ndarray:
    """`F_j = max_{j <= i < T} R[i, j] - R[T, j]` of each task j < T, T the last task (rows: after task i).

    The maximum starts at row j: the rows before it score task j before it was trained (zero-shot)."""
    last = matrix.shape[0] - 1
    since_trained = np.tril(np.ones((last, last), dtype=bool))  # row i >= column j
    best = np.where(since_trained, matrix[:last, :last], -np.inf).max(axis=0)
    return best - matrix[last, :last]


def continual_results(tasks: Sequence[Task], rows: Sequence[dict], joint: dict | None) -> dict:
    """results.json's content from each task's `{metric: [R[i, j] for j]}` (and the joint run's row)."""
    matrices = {m: np.array([row[m] for row in rows]) for m in PROTOCOL_METRICS}
    results = {
        "tasks": [list(t.selections) for t in tasks],
        "metrics": list(PROTOCOL_METRICS),
        "matrix": {m: r.tolist() for m, r in matrices.items()},
        "forgetting": {m: forgetting(r).tolist() for m, r in matrices.items()},
        "average_forgetting": {m: float(np.mean(forgetting(r))) if len(r) > 1 else 0.0 for m, r in matrices.items()},
        "final_average": {m: float(np.mean(r[-1])) for m, r in matrices.items()},
    }
    if joint is not None:
        results["joint"] = joint
        results["joint_average"] = {m: float(np.mean(joint[m])) for m in PROTOCOL_METRICS}
    return results


def _write_tensorboard(results: dict, directory: epath.Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        for metric in results["metrics"]:
            for i, row in enumerate(results["matrix"][metric]):
                for j, value in enumerate(row):
                    writer.add_scalar(f"continual/{metric}/task_{j + 1}", value, i + 1)
                writer.add_scalar(f"continual/{metric}/mean_seen", float(np.mean(row[: i + 1])), i + 1)


def run_continual(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Train `continual.tasks` in sequence under `<workdir>/continual/`, evaluate, and write the results."""
    root = checkpoints.workdir_path(workdir) / "continual"
    tasks = parse_tasks(config)
    rows, init_from = [], config.train.init_from
    for i, task in enumerate(tasks):
        if sharding.is_main_process():
            print(f"\nContinual task {i + 1}/{len(tasks)}: {task.name}")
        task_dir = root / f"task_{i + 1}"
        rows.append(_evaluated_run(config, task, task_dir, init_from, replay_classes(tasks[:i], task), tasks))
        init_from = str(task_dir)
    joint = None
    if config.continual.joint:
        if sharding.is_main_process():
            print("\nJoint run: all tasks at once")
        joint = _evaluated_run(config, union(tasks), root / "joint", config.train.init_from, {}, tasks)
    results = continual_results(tasks, rows, joint)
    if sharding.is_main_process():
        (root / "results.json").write_text(json.dumps(results, indent=1))
        markdown = report.continual_markdown(results)
        (root / "results.md").write_text(markdown)
        report.plot_continual_matrix(results, root / "results.png")
        _write_tensorboard(results, root / "tensorboard")
        print(f"\n{markdown}\nwrote {root / 'results.json'}, results.md, results.png and tensorboard/")
    return results


def unified_vs_separate_results(tasks: Sequence[Task], unified: dict, separate: Sequence[dict]) -> dict:
    """Per task: the unified model's value, the separate model's (on its own task) and unified - separate."""
    rows = []
    for j, task in enumerate(tasks):
        row = {"task": list(task.selections)}
        for m in PROTOCOL_METRICS:
            both = {"unified": unified[m][j], "separate": separate[j][m][0]}
            row[m] = {**both, "difference": both["unified"] - both["separate"]}
        rows.append(row)
    return {"metrics": list(PROTOCOL_METRICS), "tasks": rows}


def run_unified_vs_separate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """One model on all tasks and one per task (each from `train.init_from`), on the same data and recipe.

    The tasks: `continual.tasks`, else one per dataset of `data.datasets` (its `data.classes`, else all)."""
    root = checkpoints.workdir_path(workdir) / "unified_vs_separate"
    if not config.continual.tasks:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.continual.tasks = tuple(
                (f"{d}:{','.join(config.data.classes[d])}" if d in config.data.classes else d,)
                for d in config.data.datasets
            )
    tasks = parse_tasks(config)
    start = config.train.init_from
    unified = _evaluated_run(config, union(tasks), root / "unified", start, {}, tasks)
    separate = [
        _evaluated_run(config, task, root / f"separate_{j + 1}", start, {}, [task]) for j, task in enumerate(tasks)
    ]
    results = unified_vs_separate_results(tasks, unified, separate)
    if sharding.is_main_process():
        (root / "results.json").write_text(json.dumps(results, indent=1))
        markdown = report.unified_vs_separate_markdown(results)
        (root / "results.md").write_text(markdown)
        print(f"\n{markdown}\nwrote {root / 'results.json'} and results.md")
    return results
