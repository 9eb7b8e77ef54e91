"""The training loop: epochs of jitted steps, evaluation, checkpoints and logs.

A steady-state step never waits for the device: the step count lives on the host, the next
batches are put on the devices while the current step runs, and metrics are fetched only on
the steps that log them.  Every process runs the loop; process 0 alone prints, shows progress and
writes the logs and evaluation tables (orbax coordinates the checkpoint writes of all processes).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh
from tqdm import tqdm

from unimmad_jax import calibrate, checkpoints, evaluate, report, sharding, weights
from unimmad_jax.config import loss_config, model_config
from unimmad_jax.data import TrainLoader, ensure_prepared, train_loader
from unimmad_jax.models.unimmad import FROZEN, UniMMAD
from unimmad_jax.train import (
    TrainState,
    abstract_batch,
    abstract_train_state,
    create_train_state,
    learning_rate_schedule,
    make_train_step,
)


class Logger:
    """Scalars to TensorBoard and, one JSON object a line, to `metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: epath.Path):
        self.writer = self.lines = None
        if sharding.is_main_process():
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))  # tensorboardX takes `gs://` strings
            self.lines = (workdir / "metrics.jsonl").open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.lines.write(json.dumps({"step": step, **values}) + "\n")
        self.lines.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.lines.close()


class WindowTimer:
    """Images/s and the fraction of wall time blocked on the next batch (`input_wait_fraction`), over a
    logging window: from the epoch's start or the last logging step.  Host clocks only: nothing waits
    for the device."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0

    def next_batch(self, batches: Iterator, images: int):
        start = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - start
        self.images += images
        return batch

    def read(self) -> dict[str, float]:
        """The window's rates, and a new window."""
        elapsed = time.perf_counter() - self.start
        rates = {"images_per_s": self.images / elapsed, "input_wait_fraction": self.waited / elapsed}
        self.restart()
        return rates


@dataclasses.dataclass
class StepProfiler:
    """A `jax.profiler` trace of the train steps `steps` = (START, STOP) (`train.profile_steps`; empty: none),
    from the step after START steps to the one that completes STOP, in `logdir/plugins/profile/<run>/`
    where TensorBoard's profile plugin finds it.  Process 0 traces; a run resumed past START does not."""

    steps: tuple[int, ...] = ()
    logdir: str = ""
    tracing: bool = False

    def __post_init__(self):
        self.steps = tuple(self.steps)
        if self.steps and not (len(self.steps) == 2 and 0 <= self.steps[0] < self.steps[1]):
            raise ValueError(f"train.profile_steps={self.steps} is not (START, STOP) with 0 <= START < STOP")

    def before_step(self, step: int) -> None:
        """Before the step that starts after `step` steps."""
        if self.steps and step == self.steps[0] and sharding.is_main_process():
            jax.profiler.start_trace(self.logdir)
            self.tracing = True

    def after_step(self, step: int, state: TrainState) -> None:
        """After the step that completes `step` steps."""
        if self.tracing and step == self.steps[1]:
            self.stop(state)

    def stop(self, state: TrainState) -> None:
        if self.tracing:
            jax.block_until_ready(state)  # the traced steps' device work, which runs behind the host
            jax.profiler.stop_trace()
            self.tracing = False
            print(f"\nwrote the profile of steps {self.steps} to {self.logdir}/plugins/profile")


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """What every epoch of one training run uses."""

    config: ml_collections.ConfigDict
    model: UniMMAD
    mesh: Mesh
    loader: TrainLoader
    step_fn: Callable
    schedule: optax.Schedule
    logger: Logger
    workdir: epath.Path
    profiler: StepProfiler = dataclasses.field(default_factory=StepProfiler)

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch


def device_batches(run: TrainRun, depth: int) -> Iterator[dict[str, jax.Array]]:
    """The loader's batches as global arrays, `depth` of them already sent to the devices."""
    queue = collections.deque()
    while True:
        while len(queue) < depth:
            queue.append(sharding.to_global(next(run.loader.iterator), run.mesh))
        yield queue.popleft()


def train_epoch(run: TrainRun, state: TrainState, step: int, batches: Iterator) -> tuple[TrainState, int]:
    """One epoch from global step `step` (a host count); returns the state and the step after it."""
    epoch = step // run.steps_per_epoch
    config = run.config
    bar = tqdm(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{config.train.num_epochs}",
        disable=not sharding.is_main_process(),
        dynamic_ncols=True,
    )
    epoch_array = jax.device_put(np.int32(epoch), sharding.replicated(run.mesh))
    timer = WindowTimer()
    for _ in bar:
        run.profiler.before_step(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = timer.next_batch(batches, config.train.batch_size)
            state, step_metrics = run.step_fn(state, batch, epoch_array)
        step += 1
        run.profiler.after_step(step, state)
        if step % config.train.log_every_steps == 0 or step % run.steps_per_epoch == 0:
            # Logging steps are the loop's only sync point: they read the metrics and evaluate the
            # schedule on the device on purpose, even under a `jax.transfer_guard` of the caller.
            with jax.transfer_guard("allow"):
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                values["learning_rate"] = float(run.schedule(step - 1))
            values.update(timer.read())
            values["overflow_steps"] = run.loader.overflow_steps(epoch)  # of the epoch, with the full pair budget
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(f"the loss is {values['loss']} at step {step} (epoch {epoch + 1})")
            # Each process's own log (absl, shown with --verbosity=0): every process holds the same values.
            logging.info("process %d step %d: %s", jax.process_index(), step, json.dumps(values))
            bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                lr=f"{values['learning_rate']:.2e}",
                img_s=f"{values['images_per_s']:.1f}",
                input_wait=f"{values['input_wait_fraction']:.0%}",
            )
            run.logger.scalars(step, {f"train/{k}": v for k, v in values.items()})
    return state, step


def start_up_report(run: TrainRun, state: TrainState) -> dict:
    """Compile the train step ahead of the first batch and say what the run runs: devices, mesh, batch per
    device, parameters (trained, and frozen: `models.unimmad.FROZEN`) and XLA's count of the compiled step's
    FLOPs per image (a device's step over its share of a batch that fits the pair budget).

    The jitted step reuses this compile.  Every process compiles; process 0 prints the report and writes
    the resolved config to `config.json` in the workdir (readable without orbax).
    """
    config, mesh = run.config, run.mesh
    epoch = jax.ShapeDtypeStruct((), np.int32, sharding=sharding.replicated(mesh))
    start = time.perf_counter()
    # Lowering reads the state's shapes, dtypes and shardings only, and keeps its optimizer (a static field).
    batch = abstract_batch(config, mesh, config.train.batch_size, run.loader.pair_budget)
    compiled = run.step_fn.lower(state, batch, epoch).compile()
    compile_s = time.perf_counter() - start
    batch_per_device = config.train.batch_size // mesh.devices.size
    parameters = collections.Counter()
    for name, tree in state.params.items():
        parameters["frozen" if name in FROZEN else "trained"] += sum(a.size for a in jax.tree_util.tree_leaves(tree))
    facts = {
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        "batch_per_device": batch_per_device,
        "trained_parameters": parameters["trained"],
        "frozen_parameters": parameters["frozen"],
        "train_step_flops_per_image": float((compiled.cost_analysis() or {}).get("flops", np.nan)) / batch_per_device,
        "train_step_compile_s": compile_s,
    }
    if sharding.is_main_process():
        (run.workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        print(
            f"devices: {facts['devices']} {facts['device_kind']}, processes: {facts['processes']}, mesh: "
            f"{facts['mesh']}, batch: {config.train.batch_size} ({batch_per_device} per device)\n"
            f"parameters: {facts['trained_parameters']:,} trained, {facts['frozen_parameters']:,} frozen "
            f"({', '.join(FROZEN)})\ntrain step: compiled in {compile_s:.1f} s, "
            f"{facts['train_step_flops_per_image'] / 1e9:.3g} GFLOP per image\n"
            f"config: {run.workdir / 'config.json'}"
        )
        logging.info("start-up: %s", json.dumps(facts))
    return facts


def run_evaluation(run: TrainRun, state: TrainState, step: int) -> dict:
    epoch = step // run.steps_per_epoch
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    summary = evaluate.evaluate(run.model, variables, run.config, run.mesh)
    if sharding.is_main_process():
        print(f"\nEvaluation after epoch {epoch}:\n{report.summary_text(summary)}")
        report.write_summary(summary, run.workdir / "eval", f"epoch_{epoch:04d}")
        run.logger.scalars(step, {f"eval/{k}": v for k, v in evaluate.flat_scalars(summary).items()})
    return summary


def _save(run: TrainRun, manager: ocp.CheckpointManager, state: TrainState, step: int, summary) -> None:
    flat = evaluate.flat_scalars(summary) if summary is not None else None
    if flat is not None and run.config.train.best_metric not in flat:
        raise ValueError(
            f"train.best_metric={run.config.train.best_metric!r} is not an evaluation metric; "
            f"choose one of {sorted(flat)}"
        )
    meta = {
        "epoch": step // run.steps_per_epoch,
        "step": step,
        "steps_per_epoch": run.steps_per_epoch,
        "seed": run.config.seed,
        "config": run.config.to_dict(),
        "metrics": flat,
    }
    checkpoints.save(manager, state, meta, flat)


def initial_state(
    model: UniMMAD, config: ml_collections.ConfigDict, steps_per_epoch: int, mesh: Mesh, workdir: epath.PathLike
) -> TrainState:
    """Step 0 of a new run in `workdir` at `weights.starting_variables`, with a fresh optimizer and schedule,
    placed on `mesh` as `sharding.state_sharding` says (`train.fsdp`)."""
    starting = weights.starting_variables(model, config, mesh, workdir)
    state = create_train_state(model, config, steps_per_epoch, starting)
    return jax.device_put(state, sharding.state_sharding(state, mesh, config.train.fsdp))


def _start(
    model: UniMMAD,
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    mesh: Mesh,
    manager: ocp.CheckpointManager,
    workdir: epath.Path,
) -> tuple[TrainState, int]:
    """The state and global step to start from: the latest checkpoint, else `initial_state`."""
    abstract = abstract_train_state(model, config, steps_per_epoch)
    target = sharding.placed(abstract, sharding.state_sharding(abstract, mesh, config.train.fsdp))
    restored = checkpoints.restore_latest(manager, target)
    if restored is None:
        return initial_state(model, config, steps_per_epoch, mesh, workdir), 0
    state, meta = restored
    if meta["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(
            f"the checkpoints in {manager.directory} were written with {meta['steps_per_epoch']} steps per "
            f"epoch, the configured data gives {steps_per_epoch}: resume with the same data config"
        )
    if sharding.is_main_process():
        print(f"Resumed from step {meta['step']} (epoch {meta['epoch']}) in {manager.directory}")
    return state, meta["step"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> TrainState:
    """Train for `train.num_epochs` epochs, resuming from the latest checkpoint in `workdir` (local or `gs://`)."""
    workdir = checkpoints.workdir_path(workdir)
    if config.train.init_from and checkpoints.workdir_path(config.train.init_from) == workdir:
        raise ValueError(
            f"train.init_from={config.train.init_from} is the workdir itself: a run that starts from another "
            "run's weights writes to a workdir of its own (to go on with the same run, leave train.init_from empty)"
        )
    if sharding.is_main_process():
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.data_mesh()
    model = UniMMAD(model_config(config))
    ensure_prepared(config.data.datasets, config.data.data_dir)
    batch_size = sharding.per_host_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    loader = train_loader(config.data, seed=config.seed, batch_size=batch_size, groups=mesh.shape[sharding.DATA_AXIS])
    manager = checkpoints.checkpoint_manager(workdir, config)
    state, step = _start(model, config, loader.steps_per_epoch, mesh, manager, workdir)
    run = TrainRun(
        config=config,
        model=model,
        mesh=mesh,
        loader=loader,
        step_fn=make_train_step(
            model, loss_config(config), mesh, sharding.state_sharding(state, mesh, config.train.fsdp)
        ),
        schedule=learning_rate_schedule(config, loader.steps_per_epoch),
        logger=Logger(workdir),
        workdir=workdir,
        profiler=StepProfiler(config.train.profile_steps, str(workdir / "tensorboard")),
    )
    start_up_report(run, state)
    loader.seek(step)
    batches = device_batches(run, config.train.prefetch_batches)
    total = config.train.num_epochs * run.steps_per_epoch
    while step < total:
        state, step = train_epoch(run, state, step, batches)
        epoch = step // run.steps_per_epoch
        final = step == total
        summary = None
        if epoch % config.train.eval_every_epochs == 0 or final:
            summary = run_evaluation(run, state, step)
        if epoch % config.train.checkpoint_every_epochs == 0 or final:
            _save(run, manager, state, step, summary)
    run.profiler.stop(state)
    manager.wait_until_finished()
    manager.close()
    run.logger.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    calibrate.calibrate_workdir(model, variables, config, workdir, mesh, step)
    return state
