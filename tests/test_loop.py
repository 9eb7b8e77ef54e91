"""The epoch loop on the tiny config: steady-state steps never wait for the device."""

import dataclasses
import json
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config
from jax.experimental import io_callback
from jax.sharding import Mesh

from unimmad_jax import loop, sharding, train, weights
from unimmad_jax.config import loss_config, model_config
from unimmad_jax.data import first_training_images, train_loader
from unimmad_jax.models.unimmad import UniMMAD

RELEASE_TIMEOUT_S = 15
"""How long the held state waits before it is let go: only a loop that waits for the device gets there.
Under XLA's CPU collectives' 40 s limit, past which the other devices' rendezvous aborts the process."""


def test_steady_state_steps_never_wait(synthetic_data_dir, tmp_path, caplog):
    """An epoch of the real loop on 4 devices, its first step held on the device until the last is dispatched.

    The epoch's initial state comes from a host callback that blocks until the test releases it, when
    the loop dispatches the epoch's last (logging) step; every step depends on it.  A loop that reads
    any step's output before (an `int(state.step)`, a metric) would wait for the held step: it gets
    there only when the callback gives up after `RELEASE_TIMEOUT_S`, and the test fails.  The epoch runs
    under `jax.transfer_guard("disallow")` as well, which fails implicit host-to-device transfers on any
    backend (a numpy batch handed to the step) and device-to-host reads on accelerators (on a CPU they
    are not transfers).  The steps' own transfers are explicit: the prefetched batches
    (`make_array_from_process_local_data`) and the epoch scalar (`device_put`); log_every_steps exceeds
    the epoch, so only its last step logs, the loop's one deliberate sync point.
    """
    config = load_config("tiny")
    config.data.data_dir = str(synthetic_data_dir)
    config.train.log_every_steps = 1000
    # Four devices: with all eight simulated devices waiting on the held state, XLA's CPU client
    # blocks the next dispatch itself (measured), where four leave it free.
    mesh = Mesh(np.asarray(jax.devices()[:4]), (sharding.DATA_AXIS,))
    model = UniMMAD(model_config(config))
    loader = train_loader(config.data, seed=config.seed, batch_size=config.train.batch_size, groups=4)
    step_fn = train.make_train_step(model, loss_config(config), mesh)
    release, timed_out, calls = threading.Event(), [], []

    def wait_for_release():
        timed_out.append(not release.wait(timeout=RELEASE_TIMEOUT_S))
        return np.int32(0)

    @jax.jit
    def held(state):
        zero = io_callback(wait_for_release, jax.ShapeDtypeStruct((), jnp.int32))
        # A loop makes the computation asynchronous: XLA's CPU client runs loop-free ones in the caller.
        zero = jax.lax.fori_loop(0, 2, lambda _, z: z, zero)
        return jax.tree_util.tree_map(lambda x: x + zero.astype(x.dtype), state)

    def held_step_fn(state, batch, epoch):
        calls.append(len(calls))
        if len(calls) == loader.steps_per_epoch:
            release.set()
        return step_fn(state, batch, epoch)

    logger = loop.Logger(tmp_path)
    run = loop.TrainRun(
        config=config,
        model=model,
        mesh=mesh,
        loader=loader,
        step_fn=step_fn,
        schedule=train.learning_rate_schedule(config, loader.steps_per_epoch),
        logger=logger,
        workdir=tmp_path,
    )
    images = first_training_images(config.data, seed=config.seed, batch_size=config.train.batch_size)
    state = jax.device_put(
        train.create_train_state(
            model, config, loader.steps_per_epoch, weights.random_variables(model, config, images)
        ),
        sharding.replicated(mesh),
    )
    batches = loop.device_batches(run, config.train.prefetch_batches)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        facts = loop.start_up_report(run, state)  # compiles the step, which the loop then reuses
        state, step = loop.train_epoch(run, state, 0, batches)
    # The step compiles once for each pair budget (`dealing.PairBudget`) that the epoch's batches need.
    compiles = sum("Finished XLA compilation of jit(train_step)" in r.getMessage() for r in caplog.records)
    assert compiles == len({loader.pair_budget, *loader.draws.epoch(0)[1]})
    assert facts["batch_per_device"] == 2 and facts["mesh"] == {sharding.DATA_AXIS: 4}
    assert min(facts["trained_parameters"], facts["frozen_parameters"], facts["train_step_flops_per_image"]) > 0
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))
    state = held(state)
    with jax.transfer_guard("disallow"):
        state, step = loop.train_epoch(dataclasses.replace(run, step_fn=held_step_fn), state, step, batches)
    logger.close()
    assert timed_out == [False], "a steady-state step waited for the device"
    assert len(calls) == loader.steps_per_epoch
    assert step == 2 * loader.steps_per_epoch and int(state.step) == step
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [loader.steps_per_epoch, 2 * loader.steps_per_epoch]
    assert all(0 <= line["train/input_wait_fraction"] < 1 for line in logged)


@pytest.mark.parametrize("steps", [(3, 1), (2, 2), (-1, 4), (1, 2, 3)])
def test_profile_steps_must_be_a_window(steps):
    with pytest.raises(ValueError, match=r"train.profile_steps=.* is not \(START, STOP\)"):
        loop.StepProfiler(steps)
