"""Runs a config's training stages in order: init or resume, the step loop, metrics, checkpoints.

For each stage: finished (W/<stage>/FINISHED) -> skipped; a checkpoint in W/<stage>/ -> resumed exactly (state
and data iterator); otherwise params come from `init_from`, else the previous
stage's final params (fresh optimizer state), else a fresh init for the first stage.

Metrics: every log_every steps the means of the step metrics since the last log and the throughput
(tokens_per_s counts padding, real_tokens_per_s does not, supervised_tokens_per_s counts what the loss scores;
vlm_jax/train/metrics.py); with
`eval_every` > 0, every eval_every steps also the evaluate.score of the current params on the first eval_limit
records of eval_split (eval/accuracy/<type>, eval/blind_accuracy/<type>, eval/caption_f1, eval/questions).

Every process of a multi-host run runs this same loop in lockstep; only process 0 prints and writes metrics,
every process writes its part of the checkpoints (the workdir must be shared, e.g. gs://). On SIGTERM all
processes agree on a step (`distributed.Preemption`), save it and return early; the next launch resumes there.
"""
from __future__ import annotations

import collections
import json
import time
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from vlm_jax import checkpoint
from vlm_jax import config as config_lib
from vlm_jax import cpu_features, distributed, evaluate
from vlm_jax import workdir as workdir_lib
from vlm_jax.config import Config, StageConfig
from vlm_jax.generate import Generator
from vlm_jax.inputs import loader as loader_lib
from vlm_jax.inputs import shards
from vlm_jax.inputs.tile_budget import tile_budget_counts
from vlm_jax.inputs.tokenizer import load_tokenizer
from vlm_jax.model import lora as lora_lib
from vlm_jax.model import vlm
from vlm_jax.sharding import make_mesh
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import step as step_lib
from vlm_jax.train.metrics import MetricsWriter, token_counts


def run(config: Config, workdir: str, *, stage: str | None = None) -> bool:
  """Trains every stage of `config` in order (or only `stage`) into `workdir` (local path or gs://).
  Returns True when they are all finished, False when preempted (a checkpoint of the agreed step is saved)."""
  workdir = str(checkpoint.absolute(workdir))
  tokenizer = load_tokenizer(config)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config_lib.to_dict(config), indent=1) + "\n")
    tokenizer.save(epath.Path(workdir) / "tokenizer")
    print(cpu_features.describe(config.model.dtype))
  mesh = make_mesh(config.mesh)
  names = [s.name for s in config.train.stages]
  todo = names if stage is None else [config.train.stage(stage).name]
  with distributed.Preemption() as preemption:
    for name in todo:
      index = names.index(name)
      previous = names[index - 1] if index > 0 else None
      if not run_stage(config, config.train.stages[index], workdir, mesh, tokenizer, previous, preemption):
        return False
  return True


def initial_params(config: Config, stage: StageConfig, workdir: str, mesh, previous: str | None) -> tuple[Any, str]:
  """A new stage's starting params (on its param shardings, with its adapters if it has LoRA) and where they came
  from. A source stage's adapters are merged or handed on (`step.stage_params`)."""
  if stage.init_from:
    source_workdir, source_stage = checkpoint.resolve_init_from(stage.init_from)
    source = f"{source_workdir}/{source_stage}"
    source_lora = workdir_lib.read_config(source_workdir).train.stage(source_stage).lora
  elif previous is not None:
    source_workdir, source_stage, source = workdir, previous, f"stage {previous!r}"
    source_lora = config.train.stage(previous).lora
  else:
    params = step_lib.init_params(config, mesh, jax.random.PRNGKey(config.seed))
    return step_lib.stage_params(params, config, stage, mesh), f"fresh init (seed {config.seed})"
  shapes, shardings = step_lib.param_shardings(config, mesh, source_lora)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  params = checkpoint.final_params(source_workdir, source_stage, target)
  return step_lib.stage_params(params, config, stage, mesh, source_lora), source


def run_stage(config: Config, stage: StageConfig, workdir: str, mesh, tokenizer, previous: str | None,
              preemption: distributed.Preemption | None = None) -> bool:
  """Runs (or resumes, or skips) one stage. Returns True when it finished (its final checkpoint is on disk)
  and no preemption is pending; False when `preemption` stopped it at an agreed step, which is saved (at the
  stage's last step the stage still finishes, but the caller must not start the next one)."""
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  done = checkpoint.finished_step(workdir, stage.name)
  if done is not None:
    log(f"[{stage.name}] finished at step {done}; skipping.")
    return True
  shapes, _ = vlm.abstract_params(config.model)
  tx = optimizer_lib.make_optimizer(stage, shapes)
  abstract = step_lib.abstract_state(config, stage, mesh, tx)
  mngr = checkpoint.manager(workdir, stage)
  writer = MetricsWriter(workdir, stage.name)
  latest = mngr.latest_step()
  saved_shards = None if latest is None else checkpoint.data_shards(mngr, latest)
  data = shards.ShardedLoader(config, stage, tokenizer, config.data.num_shards or saved_shards, mesh=mesh)
  if latest is not None:
    state = checkpoint.restore(mngr, latest, abstract, data)
    writer.resume_from(latest)
    log(f"[{stage.name}] resumed from step {latest}.")
  else:
    params, source = initial_params(config, stage, workdir, mesh, previous)
    state = step_lib.init_state(params, tx, abstract)
    log(f"[{stage.name}] starting from {source}.")
  train_step = step_lib.make_train_step(vlm.VLM(config.model), stage, mesh, tx, abstract)
  start = int(jax.device_get(state["step"]))
  pending, tokens, tick, preempted = [], collections.Counter(), time.perf_counter(), False
  bar = tqdm.tqdm(total=stage.steps, initial=start, desc=stage.name, disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  eval_records = evaluate.eval_records(config, stage.eval_split, stage.eval_limit) if stage.eval_every else None
  for step in range(start + 1, stage.steps + 1):
    host_batch = next(data)
    tokens.update({kind: n * data.feeds for kind, n in token_counts(host_batch).items()})
    with step_lib.use_mesh(mesh):
      state, metrics = train_step(state, loader_lib.to_global(host_batch, mesh))
    pending.append(metrics)
    evaluating = eval_records is not None and step % stage.eval_every == 0
    if step % stage.log_every == 0 or step == stage.steps or evaluating:
      values = summarize(jax.device_get(pending), tokens, time.perf_counter() - tick)
      if config.data.tile_budget:  # rows this host's loader deferred, dropped or added empty, since the start
        values.update({f"tile_budget/{k}": v for k, v in tile_budget_counts(data).items()})
      if evaluating:  # outside use_mesh, like `vlm-jax eval`, so the scores equal its on this step's checkpoint
        params = lora_lib.merged(state["params"], stage.lora)
        results, _ = evaluate.score(Generator(config, params, tokenizer), eval_records, progress=False)
        values.update(evaluate.as_metrics(results))
      writer.write(step, values)
      bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
      pending, tokens, tick = [], collections.Counter(), time.perf_counter()
    # Every process asks after every step (the sync service counts steps), then saves the agreed one.
    preempted = preemption is not None and preemption.reached(step)
    checkpoint.save(mngr, step, state, data, force=step == stage.steps or preempted)
    bar.update(1)
    if preempted:
      break
  bar.close()
  if preempted and step < stage.steps:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    log(f"[{stage.name}] preempted: saved step {step}; rerun the same command to resume.")
    return False
  if mngr.latest_step() != stage.steps:  # steps == 0, or resumed right at the end
    checkpoint.save(mngr, stage.steps, state, data, force=True)
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  checkpoint.mark_finished(workdir, stage.name, stage.steps)
  log(f"[{stage.name}] finished {stage.steps} steps.")
  return not preempted


def summarize(steps: list[dict[str, np.ndarray]], tokens: dict[str, int], seconds: float
              ) -> dict[str, float | np.ndarray]:
  """Metrics of the steps since the last log: the mean of every step metric (element-wise for vectors such as
  moe/expert_load [E]), but the last lr; throughput: `<kind>_per_s` for each kind of `tokens` (the summed
  `metrics.token_counts` of the steps' batches: tokens_per_s, real_tokens_per_s, supervised_tokens_per_s) and
  step_time_s."""
  values = {k: np.mean([np.asarray(m[k], np.float64) for m in steps], axis=0) for k in steps[0]}
  values["lr"] = np.asarray(steps[-1]["lr"])
  throughput = {f"{kind}_per_s": n / seconds for kind, n in tokens.items()}
  return {**values, **throughput, "step_time_s": seconds / len(steps)}
