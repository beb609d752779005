"""What `model.dtype='auto'` computes in: bfloat16 where the matmuls have native bf16, float32 elsewhere.

  TPU, GPU         bfloat16 (their matrix units are bf16)
  CPU, native bf16 bfloat16: x86 avx512_bf16 or amx_bf16, Arm bf16 (/proc/cpuinfo flags / Features)
  other CPUs       float32: XLA:CPU runs bf16 dots through float32 conversions there, slower than float32 itself
                   (an AVX2 EPYC: f32 122, bf16 87 GFLOP/s)
  XLA_FLAGS=--xla_cpu_max_isa below AVX512_BF16: float32, as asked (the cap does not slow YNNPACK's bf16 dots
                   down, so it is no stand-in for an AVX2 machine's speed: docs/performance.md)

The CPU is read once per process (`host_native_bf16` is cached). Params stay float32 in every case.
"""
from __future__ import annotations

import functools
import os
import re

CPUINFO = "/proc/cpuinfo"
DTYPES = ("auto", "float32", "bfloat16")
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# xla_cpu_max_isa values (XLA's flag help) below which XLA:CPU emits no bf16 dot instructions.
ISAS_WITHOUT_BF16 = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI")


def cpu_flags(cpuinfo: str) -> set[str]:
  """The feature names of /proc/cpuinfo text: x86 `flags` lines, Arm `Features` lines."""
  flags: set[str] = set()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      flags.update(value.split())
  return flags


def xla_isa_cap(xla_flags: str) -> str:
  """The --xla_cpu_max_isa value in an XLA_FLAGS string, upper case ('' when absent)."""
  found = re.findall(r"--xla_cpu_max_isa=(\S+)", xla_flags)
  return found[-1].upper() if found else ""  # XLA reads the last one given


def native_bf16(cpuinfo: str, xla_flags: str = "") -> tuple[bool, str]:
  """(whether XLA:CPU gets native bf16 dot products, why) from /proc/cpuinfo text and XLA_FLAGS."""
  cap = xla_isa_cap(xla_flags)
  if cap in ISAS_WITHOUT_BF16:
    return False, f"XLA_FLAGS caps XLA:CPU's ISA at {cap}"
  flags = cpu_flags(cpuinfo)
  have = [f for f in X86_BF16_FLAGS if f in flags] or (["bf16"] if "bf16" in flags else [])
  if have:
    return True, f"the CPU has {' and '.join(have)}"
  return False, "the CPU has no native bf16 (no avx512_bf16, amx_bf16 or Arm bf16)"


@functools.cache
def host_native_bf16() -> tuple[bool, str]:
  """native_bf16 of this machine (its /proc/cpuinfo, the XLA_FLAGS environment), read once."""
  try:
    with open(CPUINFO, encoding="utf-8") as f:
      cpuinfo = f.read()
  except OSError:  # not Linux: no flags to go by
    cpuinfo = ""
  return native_bf16(cpuinfo, os.environ.get("XLA_FLAGS", ""))


def resolve(setting: str, backend: str | None = None) -> tuple[str, str]:
  """model.dtype -> (the compute dtype, why). 'auto' by `backend` (default jax.default_backend()) and, on
  CPU, by host_native_bf16; float32 and bfloat16 stay themselves."""
  if setting not in DTYPES:
    raise ValueError(f"Unknown model.dtype {setting!r}; choose one of {', '.join(DTYPES)}.")
  if setting != "auto":
    return setting, "set in the config"
  if backend is None:
    import jax  # pylint: disable=import-outside-toplevel  # vlm_jax.config imports this module: no JAX until needed
    backend = jax.default_backend()
  if backend != "cpu":
    return "bfloat16", f"the {backend} backend"
  native, why = host_native_bf16()
  return ("bfloat16" if native else "float32"), why


def describe(setting: str, backend: str | None = None) -> str:
  """One line for logs: 'model.dtype=auto -> float32 (the CPU has no native bf16 ...)'."""
  dtype, why = resolve(setting, backend)
  return f"model.dtype={setting} -> {dtype} ({why})"
