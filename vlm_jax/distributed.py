"""Multi-process JAX: joining the processes of a run, and agreeing on a step to stop at when preempted.

Every host runs the same `vlm-jax train` command; `initialize` joins them into one JAX runtime (one global
device mesh) before anything touches the backend:
- explicit coordinator flags (GPU/CPU clusters, the CPU tests): `jax.distributed.initialize(address, n, i)`;
- a Cloud TPU VM or a GKE TPU slice: `jax.distributed.initialize()` with no arguments; JAX reads the workers,
  this host's index and the coordinator from the TPU metadata / environment;
- anything else (one CPU or GPU machine): nothing, a single process.

Preemption: spot TPU VMs and maintenance events send SIGTERM, then kill the VM ~30 s later. `Preemption` is
asked after every train step whether to stop; it answers True on every process at the same step, the run
saves a checkpoint at that step and exits with PREEMPTED_EXIT_CODE, and relaunching resumes from it.
"""
from __future__ import annotations

import glob
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from vlm_jax.config import InputError

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: stopped early on purpose with a checkpoint saved; rerun


def tpu_vm() -> bool:
  """Whether this machine has TPU chips (/dev/accel* on v2-v5p, /dev/vfio/<n> on v5e/v6e) and JAX may use
  them (JAX_PLATFORMS unset or naming tpu)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None) -> None:
  """Joins this process to the run's other processes (see the module docstring for when). Call before
  anything touches the JAX backend. `cpu_devices` gives the CPU backend that many devices (tests, and
  debugging a mesh on a laptop)."""
  if cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise InputError("Give all of --coordinator HOST:PORT, --num-processes N and --process-id I "
                       f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}).")
    if not 0 <= process_id < num_processes:
      raise InputError(f"--process-id {process_id} is not in [0, {num_processes}).")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif tpu_vm():
    jax.distributed.initialize()  # also on a single-host slice: it brings the preemption sync service


def shutdown() -> None:
  """Leaves the distributed runtime (a no-op for a single process)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


class Preemption:
  """Answers "stop after this step?" the same way on every process.

  Distributed runtime: JAX's preemption sync service. Its SIGTERM notifier (C++, installed by
  `jax.distributed.initialize`) tells the coordination service; all processes then agree on max(step) + 1
  over the processes, and `reached(step)` is True on all of them at that step. Every process must call
  `reached` after every step with the same step numbers (Orbax's CheckpointManager.save asks the service too,
  with the same step). A lone process: a Python SIGTERM handler sets a flag, `reached` is True at the next
  step. Distributed with `jax_enable_preemption_service` off: never (SIGTERM then kills, as without this).
  Use as a context manager (the handler is removed on exit).
  """

  def __init__(self):
    self.distributed = jax.distributed.is_initialized()
    self.signalled = False
    self._previous = None
    # Python can only set handlers from the main thread; the C++ notifier must keep SIGTERM when distributed.
    if not self.distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    """True on every process at the same step once any of them got SIGTERM."""
    if self.distributed:
      return jax.config.jax_enable_preemption_service and multihost_utils.reached_preemption_sync_point(step)
    return self.signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> "Preemption":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
