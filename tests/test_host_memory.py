"""The `vlm-jax` command's glibc tunables: set once by re-exec, and they stop per-call page faults."""
import os
import subprocess
import sys

import pytest

from vlm_jax import host_memory

# A jitted function whose [8192, 4096] f32 intermediate (128 MB) is one of XLA's temporary buffers; the child
# prints the minor page faults per call after warm-up, and what `host_memory.active()` says.
CHILD = """
import resource, sys
from vlm_jax import host_memory
if sys.argv[1] == "tuned":
  host_memory.reexec_tuned()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
x, w = jnp.ones((8192, 256), jnp.float32), jnp.full((256, 4096), 1e-3, jnp.float32)
for _ in range(2):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x, w).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4, host_memory.active())
"""


def _child(mode):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=300,
                       check=True).stdout.split()
  return float(out[0]), out[1]


def test_tuned_env_appends_once_and_respects_the_users_choice():
  tuned = host_memory.tuned_env({"GLIBC_TUNABLES": "glibc.cpu.x86_ibt=on", "HOME": "/h"})
  assert tuned == {"GLIBC_TUNABLES": "glibc.cpu.x86_ibt=on:" + host_memory.TUNABLE, "HOME": "/h"}
  assert host_memory.tuned_env(tuned) is None
  assert host_memory.tuned_env({host_memory.OPT_OUT: "system"}) is None
  assert host_memory.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's own value stands
  assert host_memory.tuned_env({})["GLIBC_TUNABLES"] == host_memory.TUNABLE


def test_cli_main_reexecs_only_as_the_command(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(host_memory, "reexec_tuned", lambda: calls.append(1))
  from vlm_jax import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(["config", "show", "bench_cpu"]) == 0
  assert not calls  # a call from Python (tests, notebooks) never replaces the process
  monkeypatch.setattr(sys, "argv", ["vlm-jax", "config", "show", "bench_cpu"])
  assert cli.main() == 0 and calls == [1]
  assert '"name": "bench_cpu"' in capsys.readouterr().out


def _thp_mode():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      return f.read().split("[")[1].split("]")[0]  # always | madvise | never
  except (OSError, IndexError):
    return "unreadable"


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables")
def test_reexec_sets_the_tunables_and_stops_page_faults_per_call():
  system_faults, system_label = _child("system")
  tuned_faults, tuned_label = _child("tuned")
  assert (system_label, tuned_label) == ("system", host_memory.TUNABLE)
  thp = _thp_mode()
  if thp != "madvise":
    pytest.skip(f"transparent huge pages are '{thp}' in this kernel, not 'madvise': with 'never' the tunable has "
                "nothing to ask for, with 'always' every process gets huge pages without it (no difference to see)")
  # 128 MB of fresh 4 KiB pages is 32768 faults a call; in 2 MB pages, 64 (measured: ~35000 vs ~1400, the rest
  # from the smaller buffers that stay on 4 KiB pages).
  assert tuned_faults < 5000 and system_faults > 20000, (system_faults, tuned_faults)
