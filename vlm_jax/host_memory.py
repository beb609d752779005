"""Host memory for XLA:CPU: keep freed buffers in the process, on huge pages.

XLA:CPU allocates an executable's temporary buffer (779 MB for bench_cpu's bf16 train step) with posix_memalign
from a worker thread on every call. glibc serves any request over 64 MB in a thread's arena with a fresh mmap and
unmaps it on free, so each step faulted in ~190,000 zeroed 4 KiB pages (0.3 s of kernel time per 0.9 s step) and
then walked that memory through 4 KiB TLB entries. Four glibc tunables fix it: one arena (the main one, grown with
brk), no mmap, no trimming (freed memory stays for the next step), and transparent huge pages on the heap.
bench_cpu's bf16 train step: 0.93 -> 0.76 s (median of 20, two interleaved rounds); minor page faults per step
190,000 -> ~0.

glibc reads tunables only at start-up, so the `vlm-jax` command re-executes itself once with them set (`main`
below). The price: the process keeps its peak heap until it exits, as TCMalloc-style allocators do. Set
`VLM_JAX_MALLOC=system` to opt out. Other C libraries ignore all of this.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            "glibc.malloc.trim_threshold=1099511627776", "glibc.malloc.hugetlb=1")
OPT_OUT = "VLM_JAX_MALLOC"


def tuned_env(env: dict[str, str]) -> dict[str, str] | None:
  """`env` with TUNABLES appended to GLIBC_TUNABLES, or None when they are set already, opted out of, or not glibc."""
  if env.get(OPT_OUT) == "system" or platform.libc_ver()[0] != "glibc":
    return None
  current = env.get("GLIBC_TUNABLES", "")
  if all(t in current.split(":") for t in TUNABLES):
    return None
  return {**env, "GLIBC_TUNABLES": ":".join([current, *TUNABLES] if current else TUNABLES)}


def active() -> str:
  """What the bench reports: the tunables this process started with, or "system"."""
  current = os.environ.get("GLIBC_TUNABLES", "").split(":")
  return ":".join(TUNABLES) if all(t in current for t in TUNABLES) else "system"


def reexec_tuned() -> None:
  """Replaces this process by the same command line with TUNABLES set (same pid, stdio and arguments); returns
  without doing anything when they are set already or do not apply."""
  env = tuned_env(dict(os.environ))
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
