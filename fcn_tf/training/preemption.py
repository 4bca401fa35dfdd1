"""Preemption: SIGTERM caught by the run itself on every platform, all workers saving the same step.

TensorFlow's `PreemptionCheckpointHandler` agrees on the step every worker
saves at (its coordination-service protocol), but what it watches depends on
what it takes the machine for (`failure_handling_util.detect_platform`): on a
Google Cloud GPU VM it polls maintenance events and ignores SIGTERM, on
Google Cloud CPU and TPU VMs `save_checkpoint_if_preempted` returns without
saving. Spot preemptions and Kubernetes evictions send SIGTERM everywhere, so
the run installs its own SIGTERM handler (`SigtermWatcher`) and gives the
handler that watcher, with the platform-neutral behaviour: the handler's
polling thread sees the signal within a second, the worker that got it asks
every worker to save after the next step, they save the same step through the
run's own `save_fn`, then `exit_fn` stops the loop.

Evaluation does not go through the handler: `fcn_tf.eval_lib.evaluate`
all-reduces the watcher's flag with every batch, so all workers stop at the
same batch and save the step they are at (`fcn_tf.training.loop`).
"""

from __future__ import annotations

import os
import signal
import threading

import tensorflow as tf
from absl import logging
from tensorflow.python.distribute.failure_handling import failure_handling_util

# The default exit code after a preemption checkpoint: 128 + SIGTERM, what a process
# killed by SIGTERM reports, and one that Kubeflow's restartPolicy: ExitCode retries.
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
    """SIGTERM received: a checkpoint was saved and training stopped.

    Args:
      step: the step the checkpoint holds.
      checkpoint: its model checkpoint prefix.
      exit_code: the process exit code asked for (`trainer.preemption_exit_code`).
    """

    def __init__(self, step: int, checkpoint: str | None, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(
            f"preempted (SIGTERM): checkpoint saved at step {step} ({checkpoint}); rerun to resume"
        )
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = exit_code


class PreemptionExit(Exception):
    """Raised by the handler's `exit_fn` (after its save) and after an interrupted evaluation."""


class SigtermWatcher:
    """The run's own SIGTERM handler: records the signal; `received()` tells whether it came.

    Installed from the main thread only (Python's rule for signal handlers);
    `installed` says whether it could be. `close()` puts the previous handler back.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        self.installed = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self.installed = True
        except ValueError as e:  # not the main thread
            logging.warning("No preemption handling (%s)", e)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        if not self._event.is_set():
            logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._event.set()

    def received(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous)
            self.installed = False


def _raise_exit():
    raise PreemptionExit()


def make_handler(strategy, scratch: str, save_fn, watcher: SigtermWatcher):
    """TensorFlow's PreemptionCheckpointHandler watching `watcher`, the same on every platform.

    Args:
      strategy: the run's strategy (its cluster resolver, if any).
      scratch: a local folder of this process (the handler's own, empty,
        checkpoint manager lives there).
      save_fn: `(**kwargs) -> None`, saves the run's checkpoint at the
        agreed step.
      watcher: the run's `SigtermWatcher`.

    Returns:
      the handler, or None when no SIGTERM handler could be installed.
    """
    if not watcher.installed:
        return None
    # An empty manager of its own: the handler restores its manager's latest checkpoint when
    # it is made, and the run has already restored its own resume step.
    empty = tf.train.CheckpointManager(tf.train.Checkpoint(), os.path.join(scratch, "preemption"), 1)
    config = tf.distribute.experimental.TerminationConfig(
        termination_watcher_fn=watcher.received, exit_fn=_raise_exit, grace_period=0, save_fn=save_fn
    )
    detect = failure_handling_util.detect_platform
    # The platform-neutral protocol everywhere (see the module docstring); the handler reads
    # the platform once, here.
    failure_handling_util.detect_platform = lambda: failure_handling_util.PlatformDevice.UNSUPPORTED
    try:
        with strategy.scope():
            return tf.distribute.experimental.PreemptionCheckpointHandler(
                getattr(strategy, "cluster_resolver", None), empty, termination_config=config
            )
    finally:
        failure_handling_util.detect_platform = detect
