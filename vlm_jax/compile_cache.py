"""The persistent compilation cache, switched off for compiles that must really compile (the bench's timed
compiles) or whose executables it could not load back (ahead-of-time compiles for a TPU topology: no TPU client).

Only tests and users who set `jax_compilation_cache_dir` have the cache on; the switch is then needed.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def fresh_compiles(fresh: bool = True) -> Iterator[None]:
  """With `fresh`, compiles inside neither read nor write the persistent compilation cache.

  JAX decides once per process, at its first compile, whether the cache is used, so turning
  `jax_enable_compilation_cache` off later would not hold by itself: `reset_cache` makes JAX decide again, on the
  way in and on the way out.
  """
  if not fresh:
    yield
    return
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
