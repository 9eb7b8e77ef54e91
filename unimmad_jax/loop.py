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
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh
from tqdm import tqdm

from unimmad_jax import calibrate, checkpoints, evaluate, preemption, report, sharding, weights
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


def train_epoch(
    run: TrainRun,
    state: TrainState,
    step: int,
    batches: Iterator,
    at_step_end: Callable[[TrainState, int, dict], bool] = lambda state, step, metrics: False,
) -> tuple[TrainState, int]:
    """The rest of the epoch from global step `step` (a host count; mid-epoch when resumed there); returns the
    state and the step after it.  `at_step_end(state, step, metrics)` after every step: True ends the epoch
    there (a preemption)."""
    epoch = step // run.steps_per_epoch
    config = run.config
    bar = tqdm(
        range(step % run.steps_per_epoch, run.steps_per_epoch),
        initial=step % run.steps_per_epoch,
        total=run.steps_per_epoch,
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
        if at_step_end(state, step, step_metrics):
            break
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
    """The evaluation after the epoch that ends at `step`; a preemption notice stops it (`preemption.Preempted`)."""
    epoch = step // run.steps_per_epoch
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    score_fn = preemption.stoppable(evaluate.make_score_fn(run.model, run.mesh))
    summary = evaluate.evaluate(run.model, variables, run.config, run.mesh, score_fn=score_fn)
    if sharding.is_main_process():
        print(f"\nEvaluation after epoch {epoch}:\n{report.summary_text(summary)}")
        report.write_summary(summary, run.workdir / "eval", f"epoch_{epoch:04d}")
        run.logger.scalars(step, {f"eval/{k}": v for k, v in evaluate.flat_scalars(summary).items()})
    return summary


def evaluation_due(config: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> bool:
    """Whether an evaluation follows global step `step`: the end of every `train.eval_every_epochs`-th epoch
    and of the last."""
    epoch, ended = divmod(step, steps_per_epoch)
    return ended == 0 and (epoch % config.train.eval_every_epochs == 0 or epoch == config.train.num_epochs)


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every floating-point value of `tree` is finite: one reduction on the devices."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


class Checkpoints:
    """The run's checkpoints: at epoch ends (`train.checkpoint_every_epochs`), every
    `train.checkpoint_every_steps` steps, and at a preemption notice; none holds a non-finite value."""

    def __init__(self, run: TrainRun, manager: ocp.CheckpointManager):
        self.run, self.manager = run, manager
        self.last_metrics = None  # of the latest step: its loss is checked with the state it saves

    def at_step_end(self, state: TrainState, step: int, metrics: dict) -> bool:
        """`train_epoch`'s hook: a step checkpoint when one is due mid-epoch; True at a preemption notice."""
        self.last_metrics = metrics
        if preemption.reached_stop():
            return True
        every = self.run.config.train.checkpoint_every_steps
        if every and step % every == 0 and step % self.run.steps_per_epoch:
            self.save(state, step, None)
        return False

    def due_at_epoch_end(self, step: int) -> bool:
        """Whether the epoch that ends at `step` saves: every `train.checkpoint_every_epochs`-th, the last, and one
        that ends on a step checkpoint (saved here once, with the evaluation's metrics)."""
        every_steps, epoch = self.run.config.train.checkpoint_every_steps, step // self.run.steps_per_epoch
        final = epoch == self.run.config.train.num_epochs
        return (
            epoch % self.run.config.train.checkpoint_every_epochs == 0
            or final
            or bool(every_steps and step % every_steps == 0)
        )

    def save(self, state: TrainState, step: int, summary: dict | None, evaluation_due: bool = False) -> None:
        """Checkpoint `state` at global step `step`, with the metrics of `summary` (None: not evaluated).

        `evaluation_due`: the evaluation after this step is still to run (a preemption stopped it)."""
        run = self.run
        flat = evaluate.flat_scalars(summary) if summary is not None else None
        if flat is not None and run.config.train.best_metric not in flat:
            raise ValueError(
                f"train.best_metric={run.config.train.best_metric!r} is not an evaluation metric; "
                f"choose one of {sorted(flat)}"
            )
        checked = (state.params, state.batch_stats, state.opt_state, self.last_metrics)
        with jax.transfer_guard("allow"):  # a save is a sync point: orbax reads the state anyway
            finite = bool(all_finite(checked))
        if not finite:
            raise FloatingPointError(
                f"non-finite values in the train state or loss at step {step} (in epoch "
                f"{(step - 1) // run.steps_per_epoch + 1}): not saved; the latest checkpoint in "
                f"{self.manager.directory} is step {self.manager.latest_step()} (try a lower optimizer.learning_rate)"
            )
        meta = {
            "epoch": step // run.steps_per_epoch,
            "step": step,
            "steps_per_epoch": run.steps_per_epoch,
            "seed": run.config.seed,
            "config": run.config.to_dict(),
            "metrics": flat,
            "evaluation_due": evaluation_due,
        }
        checkpoints.save(self.manager, state, meta, flat)

    def save_and_stop(self, state: TrainState, step: int) -> None:
        """At a preemption notice: save `state` at `step` (unless that checkpoint exists) and say how to go on."""
        due = evaluation_due(self.run.config, step, self.run.steps_per_epoch)
        if self.manager.latest_step() != step:
            self.save(state, step, None, evaluation_due=due)
        self.manager.wait_until_finished()
        if sharding.is_main_process():
            epoch, into = divmod(step, self.run.steps_per_epoch)
            where = f"step {into}/{self.run.steps_per_epoch} of epoch {epoch + 1}" if into else f"end of epoch {epoch}"
            evaluation = "; the resumed run evaluates it first" if due else ""
            print(
                f"\nStopped by a preemption notice at step {step} ({where}{evaluation}): saved "
                f"{self.manager.directory / str(step)}; run the same command again to resume "
                f"(exit status {preemption.EXIT_STATUS})",
                flush=True,
            )


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
) -> tuple[TrainState, int, bool]:
    """The state and global step to start from, and whether the evaluation after that step is still to run:
    the newest readable checkpoint (damaged ones are moved aside), else `initial_state`."""
    abstract = abstract_train_state(model, config, steps_per_epoch)
    target = sharding.placed(abstract, sharding.state_sharding(abstract, mesh, config.train.fsdp))
    restored = checkpoints.restore_latest(manager, target)
    if restored is None:
        return initial_state(model, config, steps_per_epoch, mesh, workdir), 0, False
    state, meta = restored
    if meta["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(
            f"the checkpoints in {manager.directory} were written with {meta['steps_per_epoch']} steps per "
            f"epoch, the configured data gives {steps_per_epoch}: resume with the same data config"
        )
    if sharding.is_main_process():
        print(f"Resumed from step {meta['step']} (epoch {meta['epoch']}) in {manager.directory}")
    return state, meta["step"], meta.get("evaluation_due", False)


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
    state, step, resumed_evaluation_due = _start(model, config, loader.steps_per_epoch, mesh, manager, workdir)
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
    saves = Checkpoints(run, manager)
    total = config.train.num_epochs * run.steps_per_epoch
    try:
        if resumed_evaluation_due:  # a preemption stopped it: its checkpoint holds the state it evaluates
            run_evaluation(run, state, step)
        while step < total:
            state, step = train_epoch(run, state, step, batches, saves.at_step_end)
            if preemption.stopping():
                raise preemption.Preempted()
            summary = run_evaluation(run, state, step) if evaluation_due(config, step, run.steps_per_epoch) else None
            if saves.due_at_epoch_end(step):
                saves.save(state, step, summary)
    except preemption.Preempted:
        saves.save_and_stop(state, step)
        raise
    finally:
        run.profiler.stop(state)
        manager.wait_until_finished()
        manager.close()
        run.logger.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    calibrate.calibrate_workdir(model, variables, config, workdir, mesh, step)
    return state
