"""Multi-host training on one CPU machine: 2 processes x 4 CPU devices joined by jax.distributed (coordinator
on 127.0.0.1) train like 1 process with 8 devices, their checkpoint resumes exactly in 1 process with 2
devices, and SIGTERM makes both save an agreed step and exit with PREEMPTED_EXIT_CODE; the next launch
resumes it exactly. Data shards and the SIGTERM flag of a lone process are checked directly.

The reference is one process with the same (data=2, fsdp=2, tensor=2) mesh and data.num_shards=2, the shard
count the 2-process runs get by default (one per process), so that every run trains on the same global
batches; the 1-process resume reads its 2 shards from the checkpoint.
"""
import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import multihost_feed
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)

from vlm_jax import checkpoint
from vlm_jax import config as config_lib
from vlm_jax import distributed
from vlm_jax.inputs import shards
from vlm_jax.inputs.tokenizer import load_tokenizer
from vlm_jax.sharding import feed_group, make_mesh
from vlm_jax.train import metrics, run

CONFIG = str(pathlib.Path(__file__).parent / "tiny_run_config.py")
REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 30
MESH_8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]  # expert=1
# Float sums reduce in a different order on other device layouts (gloo across processes, 2 devices instead
# of 8); seen: <= 1e-6 over 30 steps of this tiny model, so 1e-5 still catches any change of data or state.
TOLERANCE = 1e-5


def sets(data_dir, *extra):
  return [f"data.data_dir={data_dir}", f"train.stages.align.steps={STEPS}", *extra]


def losses_by_step(workdir):
  records = metrics.read_metrics(workdir, "align")
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
  return {r["step"]: r["loss"] for r in records}


def max_diff(got, reference, steps):
  assert sorted(got) == list(steps), sorted(got)
  return max(abs(got[s] - reference[s]) for s in steps)


def saved_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "align").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """Per-step losses of the uninterrupted run: this (pytest) process, 8 devices, 2 data shards."""
  workdir = tmp_path_factory.mktemp("reference")
  cfg = config_lib.load(CONFIG, sets(shapes_data_dir, *MESH_8, "data.num_shards=2"))
  assert run.run(cfg, str(workdir), stage="align")
  losses = losses_by_step(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def child_xla_flags():
  """conftest.py's XLA flags (the plain scheduler, LLVM -O0) less its device count: `--cpu-devices` sets that."""
  return " ".join(f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def launched(workdir, logs, overrides, processes=2, cpu_devices=4):
  """Starts `vlm-jax train` in `processes` processes (one alone needs no coordinator); yields the Popens.
  Kills whatever still runs on the way out."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=child_xla_flags())
  cmd = [sys.executable, "-m", "vlm_jax.cli", "train", "--config", CONFIG, "--workdir", str(workdir), "--stage",
         "align", "--cpu-devices", str(cpu_devices)]
  port = free_port()
  procs = []
  try:
    for i in range(processes):
      group = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                          str(processes), "--process-id", str(i)]
      with open(logs / f"process_{i}.log", "wb") as log:
        procs.append(subprocess.Popen(cmd + group + ["--set", *overrides], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def log_of(logs, i):
  return (logs / f"process_{i}.log").read_text()


def finish(procs, logs, timeout=300):
  codes = [p.wait(timeout=timeout) for p in procs]
  return codes, "\n".join(f"--- process {i}:\n{log_of(logs, i)[-3000:]}" for i in range(len(procs)))


@pytest.mark.slow
def test_sigterm_saves_an_agreed_step_then_two_processes_train_like_one_and_resume_on_two_devices(
    reference, shapes_data_dir, tmp_path):  # noqa: F811
  """One story, three launches: 2 processes SIGTERMed early save an agreed step and exit PREEMPTED; 2 processes
  resume it and train to the end like 1 process with 8 devices; 1 process with 2 devices resumes their step 15."""
  workdir, logs = tmp_path / "two", tmp_path / "first_logs"
  logs.mkdir()
  overrides = sets(shapes_data_dir, *MESH_8, "train.stages.align.checkpoint_every=15")
  with launched(workdir, logs, overrides) as procs:
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
      try:
        logged = metrics.read_metrics(workdir, "align")
      except ValueError:  # caught a line half-written
        logged = []
      if logged and logged[-1]["step"] >= 3:
        break
      time.sleep(0.02)
    for p in procs:
      p.send_signal(signal.SIGTERM)
    codes, out = finish(procs, logs, timeout=120)
  assert codes == [distributed.PREEMPTED_EXIT_CODE] * 2, out
  [agreed] = saved_steps(workdir)  # the preemption save is the only checkpoint (the first periodic one is 15)
  assert 3 <= agreed < 15, agreed
  assert checkpoint.finished_step(workdir, "align") is None
  assert max(losses_by_step(workdir)) == agreed
  assert f"[align] preempted: saved step {agreed}; rerun" in log_of(logs, 0)

  logs = tmp_path / "second_logs"
  logs.mkdir()
  with launched(workdir, logs, overrides) as procs:
    codes, out = finish(procs, logs)
  assert codes == [0, 0], out
  assert f"[align] resumed from step {agreed}." in log_of(logs, 0)
  assert max_diff(losses_by_step(workdir), reference, range(1, STEPS + 1)) <= TOLERANCE
  assert saved_steps(workdir) == [15, 30] and checkpoint.finished_step(workdir, "align") == STEPS
  # Each process wrote its shard's data position; only process 0 printed.
  assert sorted(p.name for p in (workdir / "align" / "15" / "data").glob("shard_*")) == [
      "shard_0-of-2.json", "shard_1-of-2.json"]
  assert "[align] finished 30 steps." in log_of(logs, 0) and "[align]" not in log_of(logs, 1)

  # Step 15 (and the metrics file, which the resumed run trims to steps <= 15) in a fresh workdir, resumed by
  # one process with 2 devices: its 2 data shards come from the checkpoint.
  resumed, logs = tmp_path / "one", tmp_path / "one_logs"
  logs.mkdir()
  shutil.copytree(workdir / "align" / "15", resumed / "align" / "15")
  shutil.copy(workdir / "align" / "metrics.jsonl", resumed / "align" / "metrics.jsonl")
  with launched(resumed, logs, sets(shapes_data_dir, "mesh.data=2"), processes=1, cpu_devices=2) as procs:
    codes, out = finish(procs, logs)
  assert codes == [0], out
  assert "[align] resumed from step 15." in log_of(logs, 0)
  got = losses_by_step(resumed)
  assert max_diff(got, reference, range(1, STEPS + 1)) <= TOLERANCE
  assert all(np.isfinite(list(got.values())))


def test_one_process_reads_the_two_shards_a_two_process_run_reads(shapes_data_dir, tmp_path):  # noqa: F811
  cfg = config_lib.load(CONFIG, [f"data.data_dir={shapes_data_dir}"])
  stage, tokenizer = cfg.train.stage("align"), load_tokenizer(cfg)
  both = shards.ShardedLoader(cfg, stage, tokenizer, 2, process_index=0, process_count=1)
  halves = [shards.ShardedLoader(cfg, stage, tokenizer, 2, process_index=i, process_count=2) for i in (0, 1)]
  assert list(both.shard_iterators) == [0, 1] and [list(h.shard_iterators) for h in halves] == [[0], [1]]
  for _ in range(3):
    whole, first, second = next(both), next(halves[0]), next(halves[1])
    assert whole["input_ids"].shape[0] == stage.batch_size
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
  assert not np.array_equal(first["input_ids"], second["input_ids"])
  with pytest.raises(ValueError, match="2 data shards do not split over 4 processes"):
    shards.process_shards(2, 0, 4)

  # The checkpoint keeps one position per shard; restoring into another shard count is refused by name.
  mngr = checkpoint.manager(tmp_path, stage)
  checkpoint.save(mngr, 3, {"step": np.int32(3)}, both, force=True)
  mngr.wait_until_finished()
  assert checkpoint.data_shards(mngr, 3) == 2
  expected = next(both)
  fresh = shards.ShardedLoader(cfg, stage, tokenizer, 2, process_index=0, process_count=1)
  abstract = {"step": jax.ShapeDtypeStruct((), np.int32)}
  restored = checkpoint.manager(tmp_path, stage).restore(
      3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=checkpoint.DataRestore(fresh)))
  assert int(restored["state"]["step"]) == 3
  np.testing.assert_array_equal(next(fresh)["input_ids"], expected["input_ids"])
  other = shards.ShardedLoader(cfg, stage, tokenizer, 1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="has 2 shards .* this run reads 1"):
    checkpoint.manager(tmp_path, stage).restore(3, args=ocp.args.Composite(data=checkpoint.DataRestore(other)))

  # A position written by grain's own handler (process_0-of-1.json) restores as shard 0 of 1.
  first = [next(other) for _ in range(2)][0]
  legacy = ocp.CheckpointManager(tmp_path / "legacy", item_names=("data",))
  legacy.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(other.shard_iterators[0])))
  legacy.wait_until_finished()
  expected = next(other)
  fresh = shards.ShardedLoader(cfg, stage, tokenizer, 1, process_index=0, process_count=1)
  legacy_stage = dataclasses.replace(stage, name="legacy")
  assert checkpoint.data_shards(checkpoint.manager(tmp_path, legacy_stage), 3) == 1
  checkpoint.manager(tmp_path, legacy_stage).restore(
      3, args=ocp.args.Composite(data=checkpoint.DataRestore(fresh)))
  got = next(fresh)["input_ids"]
  np.testing.assert_array_equal(got, expected["input_ids"])
  assert not np.array_equal(got, first["input_ids"])


def test_hosts_of_one_batch_shard_feed_the_same_rows(shapes_data_dir, tmp_path):  # noqa: F811
  """tensor=8 over 2 hosts: one feed group, so both hosts feed the whole batch, the batches of 1 process with 8
  devices; data=8 over 2 hosts: 2 groups of half batches, the batches of 1 process reading 2 data shards."""
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=child_xla_flags())
  procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "multihost_feed.py"), CONFIG, shapes_data_dir,
                             str(tmp_path), f"127.0.0.1:{port}", "2", str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (0, 1)]
  try:
    outs = [p.communicate(timeout=180)[0].decode()[-3000:] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
  for name, overrides in multihost_feed.MESHES.items():
    extra = ["data.num_shards=2"] if name == "data8" else []
    cfg = config_lib.load(CONFIG, [f"data.data_dir={shapes_data_dir}", *overrides, *extra])
    mesh = make_mesh(cfg.mesh)
    assert feed_group(mesh) == (0, 1)
    reference = multihost_feed.global_batches(cfg, mesh)
    for i in (0, 1):
      with np.load(tmp_path / f"{name}_process_{i}.npz") as got:
        assert sorted(got) == sorted(f"{b}/{k}" for b in range(len(reference)) for k in reference[b])
        for b, batch in enumerate(reference):
          assert batch["input_ids"].shape[0] == cfg.train.stage("align").batch_size
          for k, v in batch.items():
            np.testing.assert_array_equal(got[f"{b}/{k}"], v, err_msg=f"{name} process {i} batch {b} {k}")
  assert not np.array_equal(reference[0]["input_ids"], reference[1]["input_ids"])


def test_lone_process_sigterm_flag():
  before = signal.getsignal(signal.SIGTERM)
  with distributed.Preemption() as preemption:
    assert not preemption.distributed and not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
    assert preemption.reached(2) and preemption.reached(3)
  assert signal.getsignal(signal.SIGTERM) is before
