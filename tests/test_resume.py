"""Runs of a tiny two-stage config on shapes_vqa/tiny: exact resume after SIGKILL, stage handoff, skipping
finished stages, the workdir layout and logged metrics."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import checkpoint
from vlm_jax import config as config_lib
from vlm_jax.inputs import shards
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.losses import supervised_tokens
from vlm_jax.sharding import make_mesh
from vlm_jax.train import metrics, optimizer, run, step

CONFIG = str(pathlib.Path(__file__).parent / "tiny_run_config.py")
REPO = pathlib.Path(__file__).resolve().parent.parent


def load(data_dir):
  return config_lib.load(CONFIG, [f"data.data_dir={data_dir}"])


@pytest.fixture(scope="module")
def uninterrupted(shapes_data_dir, tmp_path_factory):  # noqa: F811
  """Both stages run start to finish in this process: (config, workdir)."""
  cfg = load(shapes_data_dir)
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run.run(cfg, str(workdir))
  return cfg, workdir


def losses_by_step(workdir, stage):
  records = metrics.read_metrics(workdir, stage)
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
  return {r["step"]: r["loss"] for r in records}


def train_cli(workdir, data_dir, log, overrides=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["XLA_FLAGS"],  # conftest.py's, as in this process
             JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/vlm_jax/jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, "-m", "vlm_jax.cli", "train", "--config", CONFIG, "--workdir", str(workdir), "--stage",
         "align", "--set", f"data.data_dir={data_dir}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def kill_then_restart(workdir, data_dir, tmp_path, overrides=()):
  """Trains align in a subprocess, SIGKILLs it once step 12 is logged (step 5 is committed by then; a save still in
  flight is not), restarts it to the end. -> (killed at step, the step the restart resumed from)."""
  with open(tmp_path / "first.log", "wb") as log:
    proc = train_cli(workdir, data_dir, log, overrides)
    try:
      deadline = time.time() + 240
      while time.time() < deadline and proc.poll() is None:
        try:
          logged = metrics.read_metrics(workdir, "align")
        except ValueError:  # caught a line half-written
          logged = []
        if logged and logged[-1]["step"] >= 12:
          break
        time.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = metrics.read_metrics(workdir, "align")[-1]["step"]
  assert 12 <= killed_at < 30, killed_at
  assert checkpoint.finished_step(workdir, "align") is None
  with open(tmp_path / "second.log", "wb") as log:
    proc = train_cli(workdir, data_dir, log, overrides)
    assert proc.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()[-3000:]
  out = (tmp_path / "second.log").read_text()
  resumed = int(out.split("[align] resumed from step ")[1].split(".")[0])
  assert 5 <= resumed <= killed_at and resumed % 5 == 0
  return killed_at, resumed


def test_sigkill_then_restart_reproduces_every_step_loss(uninterrupted, shapes_data_dir, tmp_path):  # noqa: F811
  cfg, reference_dir = uninterrupted
  reference = losses_by_step(reference_dir, "align")
  assert sorted(reference) == list(range(1, 31))
  workdir = tmp_path / "killed"
  kill_then_restart(workdir, shapes_data_dir, tmp_path)
  got = losses_by_step(workdir, "align")
  assert sorted(got) == list(range(1, 31))
  diff = max(abs(got[s] - reference[s]) for s in reference)
  assert diff <= 1e-6, diff
  assert checkpoint.finished_step(workdir, "align") == 30


def test_stage_handoff_fresh_optimizer_and_skipping(uninterrupted, capsys):
  cfg, workdir = uninterrupted
  mesh = make_mesh(cfg.mesh)
  shapes, _ = step.param_shardings(cfg, mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), shapes)
  align = jax.device_get(checkpoint.final_params(workdir, "align", target))
  instruct = jax.device_get(checkpoint.final_params(workdir, "instruct", target))
  fresh = jax.device_get(step.init_params(cfg, mesh, jax.random.PRNGKey(cfg.seed)))
  same = lambda a, b: all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # instruct trains the decoder only: its projector is align's final projector, which moved off the init.
  assert same(instruct["projector"], align["projector"])
  assert not any(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(align["projector"]),
                                                     jax.tree.leaves(fresh["projector"])))
  assert same(instruct["vision"], fresh["vision"]) and same(align["decoder"], fresh["decoder"])
  assert not same(instruct["decoder"], align["decoder"])
  # instruct's optimizer started fresh: its step counts are 4, not 30 + 4; no moments for the projector.
  stage = cfg.train.stage("instruct")
  tx = optimizer.make_optimizer(stage, shapes)
  abstract = step.abstract_state(cfg, stage, mesh, tx)
  state = jax.device_get(checkpoint.restore(checkpoint.manager(workdir, stage), 4, abstract))
  counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
  assert counts == [4, 4] and int(state["step"]) == 4
  moments = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state["opt_state"])) - 8
  assert moments == 2 * sum(np.asarray(x).nbytes for x in jax.tree.leaves(state["params"]["decoder"]))
  # A second run skips both finished stages and writes nothing new.
  before = {s: (checkpoint.manager(workdir, cfg.train.stage(s)).all_steps(),
                (workdir / s / "metrics.jsonl").read_text()) for s in ("align", "instruct")}
  capsys.readouterr()
  run.run(cfg, str(workdir))
  out = capsys.readouterr().out
  assert "[align] finished at step 30; skipping." in out and "[instruct] finished at step 4; skipping." in out
  after = {s: (checkpoint.manager(workdir, cfg.train.stage(s)).all_steps(),
               (workdir / s / "metrics.jsonl").read_text()) for s in ("align", "instruct")}
  assert after == before and before["align"][0] == [25, 30]


def test_workdir_layout_and_logged_metrics(uninterrupted):
  cfg, workdir = uninterrupted
  assert config_lib.from_dict(config_lib.Config, json.loads((workdir / "config.json").read_text())) == cfg
  assert (workdir / "tokenizer" / "tokenizer.model").exists()
  assert (workdir / "tokenizer" / "special_tokens.json").exists()
  assert list((workdir / "tensorboard" / "align").glob("events.out.tfevents.*"))
  records = metrics.read_metrics(workdir, "align")
  assert set(records[0]) == {"step", "loss", "aux_loss", "grad_norm", "lr", "num_tokens", "tokens_per_s",
                             "real_tokens_per_s", "supervised_tokens_per_s", "step_time_s"}
  schedule = optimizer.schedule(cfg.train.stage("align"))
  np.testing.assert_allclose([r["lr"] for r in records], [float(schedule(s)) for s in range(30)], rtol=1e-6)
  assert records[0]["lr"] == 0.0 and abs(records[2]["lr"] - 1e-2) < 1e-9
  assert all(r["tokens_per_s"] > 0 and r["num_tokens"] > 0 and r["grad_norm"] > 0 for r in records)
  # num_tokens: each step's supervised tokens, counted on the same data stream rebuilt here (one step per record).
  data = shards.ShardedLoader(cfg, cfg.train.stage("align"), Tokenizer.load(workdir / "tokenizer"),
                              cfg.data.num_shards or jax.process_count())
  assert [r["num_tokens"] for r in records] == [int(supervised_tokens(next(data)["labels"])) for _ in records]
  # Caption rows: 8 rows of 64 positions per step.
  assert records[5]["tokens_per_s"] * records[5]["step_time_s"] == pytest.approx(8 * 64, rel=1e-6)
