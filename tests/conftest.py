"""Test setup: CPU backend with 8 virtual devices, a persistent compilation cache, tiny models."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub: fail fast instead of trying the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The concurrency-optimized CPU scheduler deadlocked two all-gathers of the contrastive step on 8 virtual
# devices (XLA:CPU); the plain scheduler does not.
# The tests check numerics, not speed: LLVM at -O0 halves XLA:CPU's compile time, most of a cold run (the HLO
# passes still run; the bench and users keep XLA's default). The legacy elemental emitters instead of the MLIR
# fusion emitters cut the suite's compile time by a further third. Subprocesses of tests inherit these flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false"
                           " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/vlm_jax/jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
