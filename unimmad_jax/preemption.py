"""Stopping a training run on a preemption notice, at a boundary every process agrees on.

A TPU VM that is about to be preempted or maintained, like most schedulers' jobs, gets SIGTERM some
seconds before it stops.  With several processes, JAX's coordination service listens for it (its
preemption notifier, set up by `jax.distributed.initialize`) and tells every process; all of them
stop at the same boundary, `multihost_utils.reached_preemption_sync_point`.  In one process, a SIGTERM
handler, installed while `sigterm_notice` runs, sets a flag.

Boundaries are the ends of training steps and the starts of evaluation batches, counted in the
order every process reaches them.  At the agreed boundary the loop saves and raises `Preempted`;
the command exits with `EXIT_STATUS`, and running it again resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils

EXIT_STATUS = 143
"""The command's exit status when stopped and resumable: 128 + SIGTERM, as a shell reports a process SIGTERM ends."""


class Preempted(Exception):
    """Raised at the boundary where the run stops: the training loop saves and re-raises it, the command exits
    with `EXIT_STATUS`."""


class _Notice:
    """What this process knows of a preemption notice: the boundaries counted and whether to stop at this one."""

    def __init__(self):
        self.boundaries = 0
        self.sigterm = threading.Event()
        self.stopping = False


_notice = _Notice()


@contextlib.contextmanager
def sigterm_notice() -> Iterator[None]:
    """While the block runs, SIGTERM asks the run to stop at its next boundary instead of ending the process.

    With several processes, JAX's own listener gets the signal: nothing is installed."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _notice.sigterm.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reached_stop() -> bool:
    """Count a boundary; whether the run stops here.  Every process calls it at the same boundaries."""
    if not _notice.stopping:
        _notice.boundaries += 1
        if jax.process_count() > 1:
            _notice.stopping = multihost_utils.reached_preemption_sync_point(_notice.boundaries)
        else:
            _notice.stopping = _notice.sigterm.is_set()
    return _notice.stopping


def stopping() -> bool:
    """Whether a boundary already reached is where the run stops."""
    return _notice.stopping


def stoppable(score_fn: Callable) -> Callable:
    """`score_fn` (an evaluation step) that first counts a boundary and raises `Preempted` if the run stops there."""

    def checked(*args):
        if reached_stop():
            raise Preempted()
        return score_fn(*args)

    return checked
