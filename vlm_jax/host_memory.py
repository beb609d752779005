"""Host memory for XLA:CPU: transparent huge pages for malloc.

XLA:CPU allocates an executable's temporary buffer (779 MB for bench_cpu's bf16 train step) with posix_memalign
on every call, and glibc serves a request that large with a fresh mmap, unmapped again on free. With 4 KiB pages
each step faulted in ~190,000 zeroed pages (about 0.3 s of kernel time per 0.9 s step) and then walked that
memory through 4 KiB TLB entries. The tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) has malloc ask for
transparent huge pages (madvise), which this machine grants: bench_cpu's bf16 train step 0.86/0.96 -> 0.79/0.79 s
(medians of 16, two interleaved rounds), and minor page faults 35,000 -> ~1,400 per call of a function with a
128 MB temporary (tests/test_host_memory.py; the rest are smaller buffers that stay on 4 KiB pages).

Also measured, not used: one arena with no mmap and no trimming (freed memory kept for the next step, never
zeroed again) is a little faster still (bf16 step at sequence 512: 2.41/2.59 s system, 2.05/2.04 huge pages,
1.91/1.88 with both), but a single arena made transformers' bf16 train step in the same process 1.2-1.4 -> 1.8-2.1 s,
and the bench runs both sides in one process.

glibc reads tunables only at start-up, so the `vlm-jax` command re-executes itself once with the tunable set
(`reexec_tuned`, called by `cli.main`), on CPU hosts only: on a TPU or GPU host XLA keeps its buffers in device
memory and the re-exec buys nothing. Set `VLM_JAX_MALLOC=system` to opt out. Other C libraries ignore it.
"""
from __future__ import annotations

import glob
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "VLM_JAX_MALLOC"
# Device files of TPU VMs (v4: /dev/accel*, v5e / v5p / v6e: /dev/vfio/<n>) and of NVIDIA GPUs.
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def cpu_host(env: dict[str, str]) -> bool:
  """Whether JAX will compute on the CPU here: JAX_PLATFORMS' first entry when set, else no TPU or GPU device
  files (read before JAX starts, so this never initializes a backend)."""
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def tuned_env(env: dict[str, str]) -> dict[str, str] | None:
  """`env` with TUNABLE appended to GLIBC_TUNABLES, or None when opted out of, not glibc, not a CPU host
  (`cpu_host`), or when GLIBC_TUNABLES already names glibc.malloc.hugetlb (with any value: the user's choice
  stands)."""
  if env.get(OPT_OUT) == "system" or platform.libc_ver()[0] != "glibc" or not cpu_host(env):
    return None
  current = env.get("GLIBC_TUNABLES", "")
  if TUNABLE.split("=")[0] in {item.split("=")[0] for item in current.split(":")}:
    return None
  return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def active() -> str:
  """What the bench reports: TUNABLE if this process started with it, else "system"."""
  return TUNABLE if TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":") else "system"


def reexec_tuned() -> None:
  """Replaces this process by the same command line with TUNABLE set (same pid, stdio and arguments); returns
  without doing anything when they are set already or do not apply."""
  env = tuned_env(dict(os.environ))
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
