"""`vlm-jax bench --serve`: the serving engine under 1, 4 and 16 concurrent clients, against transformers.

Each client is a thread that sends its next request when the last one is answered (closed loop), 2 requests per
client (at least 4 in all). A request is one image and a question (measure.requests), answered greedily with
exactly plan.new_tokens tokens (stop tokens barred, on both sides). Ours: `serve.engine.Engine` with one slot
per client of the largest level, in the config's dtype, called in-process (no HTTP: the same on both sides).
transformers: the same random-init model exported and loaded back (torch_side.load_exported), float32, its
`generate` called per request in arrival order by one worker, as a simple web wrapper does.
Per level: output tokens/s (all answers' tokens / wall time of the level) and time to first token (submit to
first token drawn; p50, p99 over the level's requests).
"""
from __future__ import annotations

import pathlib
import queue
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from vlm_jax.bench import measure
from vlm_jax.config import Config
from vlm_jax.generate import Generator
from vlm_jax.inputs.tokenizer import IMAGE_TOKEN, train_sentencepiece
from vlm_jax.serve.engine import Engine, Finish, Request
from vlm_jax.sharding import make_mesh
from vlm_jax.train import step as step_lib

CLIENTS = (1, 4, 16)


def closed_loop(answer: Callable[[dict], float], encoded: list[dict], clients: int, new_tokens: int) -> dict:
  """`clients` threads share the requests, each sending its next one once answered; answer(request) -> its
  time to first token (s). -> tokens/s and TTFT p50 / p99."""
  todo = queue.Queue()
  for e in encoded:
    todo.put(e)
  ttfts, lock = [], threading.Lock()

  def client():
    while True:
      try:
        e = todo.get_nowait()
      except queue.Empty:
        return
      t = answer(e)
      with lock:
        ttfts.append(t)
  threads = [threading.Thread(target=client) for _ in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  return {"clients": clients, "requests": len(encoded), "wall_s": wall,
          "tokens_per_s": len(encoded) * new_tokens / wall, "ttft_p50_s": float(np.percentile(ttfts, 50)),
          "ttft_p99_s": float(np.percentile(ttfts, 99))}


def _ours(engine: Engine, new_tokens: int) -> Callable[[dict], float]:
  def answer(e):
    done = threading.Event()
    out = {}

    def emit(event):
      if isinstance(event, Finish):
        out["finish"] = event
        done.set()
    start = time.perf_counter()
    engine.submit(Request(e["input_ids"], e["tiles"], new_tokens, emit, min_tokens=new_tokens))
    done.wait()
    if out["finish"].completion_tokens != new_tokens:
      raise RuntimeError(f"the engine drew {out['finish'].completion_tokens} tokens, not {new_tokens}.")
    return out["finish"].first_token_at - start
  return answer


def _transformers(model: Any, config: Config, generator: Generator, new_tokens: int) -> tuple[Callable, Callable]:
  """(answer, stop): one worker thread runs `generate` for each request in arrival order."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers.generation.streamers import BaseStreamer  # pylint: disable=import-outside-toplevel

  from vlm_jax.bench import torch_side  # pylint: disable=import-outside-toplevel
  jobs: queue.Queue = queue.Queue()

  class FirstToken(BaseStreamer):
    """generate calls put() with the prompt, then with each new token: the second call is the first token."""
    def __init__(self):
      self.calls, self.at = 0, 0.0

    def put(self, value):
      self.calls += 1
      if self.calls == 2:
        self.at = time.perf_counter()

    def end(self):
      pass

  def worker():
    while (job := jobs.get()) is not None:
      e, result, done = job
      inputs = torch_side.torch_inputs(config, generator.batch([e]))
      streamer = FirstToken()
      with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=streamer)
      result["tokens"] = out.shape[1] - inputs["input_ids"].shape[1]
      result["at"] = streamer.at
      done.set()
  thread = threading.Thread(target=worker, daemon=True)
  thread.start()

  def answer(e):
    result, done = {}, threading.Event()
    start = time.perf_counter()
    jobs.put((e, result, done))
    done.wait()
    if result["tokens"] != new_tokens:
      raise RuntimeError(f"transformers generated {result['tokens']} tokens, not {new_tokens}.")
    return result["at"] - start

  def stop():
    jobs.put(None)
    thread.join()
  return answer, stop


def run(config: Config, plan: measure.Plan, log=print) -> dict[str, Any]:
  """Both sides at each client count -> {"ours": [per level], "transformers": [...], "ratios": {...}}."""
  from vlm_jax.bench import torch_side  # pylint: disable=import-outside-toplevel
  params = step_lib.init_params(config, make_mesh(config.mesh), jax.random.PRNGKey(config.seed))
  results: dict[str, Any] = {"config": config.name, "dtype": config.model.compute_dtype, "new_tokens": plan.new_tokens,
                             "clients": list(CLIENTS), "ours": [], "transformers": []}
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer_dir = pathlib.Path(tmp) / "tokenizer"
    tokenizer = train_sentencepiece(measure.CORPUS, 400)  # prompts only; model ids past it are never drawn
    tokenizer.save(tokenizer_dir)
    engine = Engine(config, params, tokenizer, slots=max(CLIENTS), max_images=1)
    log(f"serve: compiling {len(engine.buckets)} prompt buckets and the decode step")
    engine.warm_up()
    compiled = engine.compiled_programs()
    engine.start()
    encoded = [engine.encode([{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}], ims)
               for ims, q in measure.requests(2 * max(CLIENTS))]
    batches = {c: encoded[:max(4, 2 * c)] for c in CLIENTS}
    closed_loop(_ours(engine, plan.new_tokens), encoded[:2], 2, plan.new_tokens)  # first-call allocations
    for c in CLIENTS:
      log(f"serve: ours, {c} client(s)")
      results["ours"].append(closed_loop(_ours(engine, plan.new_tokens), batches[c], c, plan.new_tokens))
    engine.close()
    if engine.compiled_programs() != compiled:
      raise RuntimeError(f"serving compiled {engine.compiled_programs() - compiled} new programs.")
    torch_side.set_threads()
    log("serve: transformers export")
    model = torch_side.load_exported(config, params, tokenizer_dir, pathlib.Path(tmp) / "hf")
    answer, stop = _transformers(model, config, Generator(config, params, tokenizer), plan.new_tokens)
    closed_loop(answer, encoded[:1], 1, plan.new_tokens)  # warm-up
    for c in CLIENTS:
      log(f"serve: transformers, {c} client(s)")
      results["transformers"].append(closed_loop(answer, batches[c], c, plan.new_tokens))
    stop()
  last = results["ours"][-1], results["transformers"][-1]
  results["ratios"] = {f"tokens_per_s_{CLIENTS[-1]}_clients": last[0]["tokens_per_s"] / last[1]["tokens_per_s"],
                       f"ttft_p50_{CLIENTS[-1]}_clients": last[1]["ttft_p50_s"] / last[0]["ttft_p50_s"]}
  return results


def table(results: dict[str, Any]) -> str:
  """The levels side by side, then the two ratios at the most clients."""
  lines = [f"serve: {results['config']} ({results['dtype']}; transformers float32), {results['new_tokens']} new "
           "tokens per request",
           f"{'clients':>7} {'requests':>8} | {'ours tok/s':>10} {'TTFT p50':>9} {'p99':>7} | "
           f"{'hf tok/s':>9} {'TTFT p50':>9} {'p99':>7}"]
  for ours, hf in zip(results["ours"], results["transformers"]):
    lines.append(f"{ours['clients']:>7} {ours['requests']:>8} | {ours['tokens_per_s']:>10.1f} "
                 f"{ours['ttft_p50_s']:>8.3f}s {ours['ttft_p99_s']:>6.3f}s | {hf['tokens_per_s']:>9.1f} "
                 f"{hf['ttft_p50_s']:>8.3f}s {hf['ttft_p99_s']:>6.3f}s")
  r = results["ratios"]
  c = results["clients"][-1]
  lines.append(f"at {c} clients: ours / transformers tokens/s {r[f'tokens_per_s_{c}_clients']:.2f}x (target >= 3); "
               f"transformers / ours p50 TTFT {r[f'ttft_p50_{c}_clients']:.2f}x (target > 1)")
  return "\n".join(lines)
