"""Continuous batching: a fixed number of decode slots over one preallocated KV cache.

Each slot is one row of the cache (context length L). A request's prompt (ids [n], tiles) is right-padded
to a bucket P (16, 32, 64, ... up to L) and prefilled alone, then its K/V are written into a free slot's row at
[0, P) with that slot's cache index set to n: its first generated token overwrites the first pad slot, and the
pad slots after it keep segment 0, so they are never attended. Between prefills every busy slot advances
together, `steps_per_call` tokens per device call: the decode step is the model's batch-1 `decode_step`
vmapped over slots, so each slot carries its own cache index and RoPE position. A slot stops on its own EOS or
`<|im_end|>`, stop string or token limit, and is reused by the next waiting request.

Shapes are static: one prefill program per bucket and one decode program compile at start-up
(`compiled_programs` counts them) and nothing compiles while serving. The math is `vlm-jax generate`'s: the
same prompt (ChatML, images expanded), the decoder pre-cast and unscanned once (`generate.decode_inputs`),
token i drawn with `fold_in(key(seed), i)` from ids below the tokenizer's vocab, so a greedy answer is the one
`generate` gives for the request alone.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import Config
from vlm_jax.generate import decode_inputs
from vlm_jax.inputs import examples, packing
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.model.decoder import unscanned
from vlm_jax.model.vlm import VLM, init_cache

FIRST_BUCKET = 16


def prompt_buckets(context: int) -> tuple[int, ...]:
  """Prompt lengths that compile: powers of two from FIRST_BUCKET, and the context itself."""
  buckets, p = [], FIRST_BUCKET
  while p < context:
    buckets.append(p)
    p *= 2
  return tuple(buckets + [context])


@dataclasses.dataclass
class Request:
  """One conversation to answer. input_ids int32 [n], tiles uint8 [t, H, W, 3] (from `Engine.encode`).
  temperature 0 = greedy, top_k 0 = off, top_p 1 = off; `emit` is called on the engine's thread with
  Delta and Finish events."""
  input_ids: np.ndarray
  tiles: np.ndarray
  max_tokens: int
  emit: Callable[[Any], None]
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  min_tokens: int = 0  # no stop token before this many (generate's min_new_tokens; the benchmark's fixed lengths)
  cancelled: bool = False

  def cancel(self) -> None:
    """Frees the request's slot at the engine's next step; no more events are emitted."""
    self.cancelled = True


@dataclasses.dataclass(frozen=True)
class Delta:
  text: str


@dataclasses.dataclass(frozen=True)
class Finish:
  """The whole answer (stop token and stop string cut), why it ended (stop | length | error), token counts."""
  text: str
  token_ids: tuple[int, ...]
  finish_reason: str
  prompt_tokens: int
  completion_tokens: int
  first_token_at: float = 0.0  # time.perf_counter() when the first token was drawn (time to first token)


class EngineClosed(RuntimeError):
  """The engine is shutting down and takes no new requests."""


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
  """`generate.sample` with per-row settings (arrays, so no setting recompiles): logits f32 [B, V], keys [B],
  temperature/top_p f32 [B], top_k int32 [B] -> ids int32 [B]. Row b draws as a batch of one with keys[b]."""
  def one(logits, key, temperature, top_k, top_p):
    greedy = jnp.argmax(logits).astype(jnp.int32)
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)
    ordered = jnp.sort(logits)[::-1]
    kth = ordered[jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    ordered = jnp.where((top_k > 0) & (ordered < kth), -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered)
    keep = jnp.cumsum(probs) - probs < top_p  # the mass before an id is below top_p (the top id stays)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf))
    logits = jnp.where((top_p < 1) & (logits < threshold), -jnp.inf, logits)
    drawn = jax.random.categorical(key, logits[None], axis=-1)[0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
  # All-greedy steps (the common case) skip the sort: cond runs one branch, the same ids either way.
  return jax.lax.cond(jnp.any(temperature > 0), lambda: jax.vmap(one)(logits, keys, temperature, top_k, top_p),
                      lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _allowed(logits: jax.Array, vocab_size: int, stop_ids: tuple[int, ...], step: jax.Array,
             min_tokens: jax.Array) -> jax.Array:
  """logits [B, V] with ids past the tokenizer's vocab barred, and the stop ids while step < min_tokens ([B])."""
  vocab = jnp.arange(logits.shape[-1])
  stop = jnp.isin(vocab, jnp.asarray(stop_ids, jnp.int32))
  barred = (vocab >= vocab_size)[None] | (stop[None] & (step < min_tokens)[:, None])
  return jnp.where(barred, -jnp.inf, logits)


def _prefill_into(params, slots, batch, slot, length, key, temperature, top_k, top_p, min_tokens, *, model,
                  vocab_size, stop_ids):
  """One right-padded prompt [1, P] into row `slot` of the slot cache -> (first token int32 [], slot cache).
  length = the prompt's real tokens n (the row's index becomes n); key: uint32 key data [2]."""
  key = jax.random.wrap_key_data(key)
  cache = init_cache(model, 1, batch["input_ids"].shape[1])
  logits, state = VLM(model).apply({"params": params, "cache": cache}, batch, method=VLM.prefill,
                                   mutable=["cache"])
  filled = state["cache"]["decoder"]
  if model.scan_layers:
    filled = unscanned(filled, model.decoder)
  seg = slots["decoder"]["segment_ids"]
  row = jnp.zeros(seg.shape[1:], jnp.int32).at[:, :filled["segment_ids"].shape[1]].set(filled["segment_ids"])

  def put(path, dst, src):
    if path[-1].key == "index":
      return dst.at[slot].set(length)
    if path[-1].key == "segment_ids":
      return dst.at[slot].set(row)
    return jax.lax.dynamic_update_slice(dst, src[None].astype(dst.dtype), (slot,) + (0,) * src.ndim)
  decoder = jax.tree_util.tree_map_with_path(put, slots["decoder"], filled)
  last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)
  allowed = _allowed(last, vocab_size, stop_ids, jnp.zeros([1], jnp.int32), min_tokens[None])
  token = sample_rows(allowed, jax.random.fold_in(key, 0)[None], temperature[None], top_k[None], top_p[None])[0]
  return token, {**slots, "decoder": decoder}


def _decode_chunk(params, slots, last, steps, keys, temperature, top_k, top_p, min_tokens, active, *, model,
                  vocab_size, stop_ids, num_steps):
  """`num_steps` decode steps of every slot -> (tokens int32 [S, num_steps], slot cache). last [S]: each
  slot's latest token (it sits at the slot's cache index); steps [S]: that token's index i in its answer.
  Idle slots (active False) compute too, but their cache index stays. keys: uint32 key data [S, 2]."""
  keys = jax.random.wrap_key_data(keys)
  def step_one(cache, token):
    position = cache["decoder"]["index"].reshape(1, 1)
    logits, state = VLM(model).apply({"params": params, "cache": cache}, token.reshape(1, 1), position,
                                     method=VLM.decode_step, mutable=["cache"])
    return logits[0, 0], state["cache"]

  def body(carry, _):
    slots, last, steps = carry
    logits, new = jax.vmap(step_one)(slots, last)
    index = jnp.where(active, new["decoder"]["index"], slots["decoder"]["index"])
    new = {**new, "decoder": {**new["decoder"], "index": index}}
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps + 1)
    token = sample_rows(_allowed(logits, vocab_size, stop_ids, steps + 1, min_tokens), step_keys, temperature,
                        top_k, top_p)
    return (new, token, steps + 1), token

  (slots, _, _), tokens = jax.lax.scan(body, (slots, last, steps), None, length=num_steps)
  return tokens.T, slots


def _key(seed: int) -> np.ndarray:
  return np.asarray(jax.random.key_data(jax.random.key(seed)))


@dataclasses.dataclass
class _Slot:
  """Host-side state of a busy slot."""
  request: Request
  ids: list[int]
  key: np.ndarray  # uint32 [2]: the data of jax.random.key(seed)
  count: int = 0  # tokens drawn, stop token included
  sent: str = ""  # text emitted as deltas so far
  first_token_at: float = 0.0


class Engine:
  """`Engine(config, params, tokenizer, slots=4).submit(Request(...))`; `start()` runs the scheduler thread,
  `close()` finishes every request in flight and stops it."""

  def __init__(self, config: Config, params: Any, tokenizer: Tokenizer, *, slots: int = 4, max_images: int = 4,
               steps_per_call: int = 4, context: int | None = None):
    self.config, self.tokenizer = config, tokenizer
    self.preprocessor = examples.Preprocessor(config, tokenizer)
    self.context = context or config.data.seq_len
    self.buckets = prompt_buckets(self.context)
    self.max_images = max_images
    self.tile_slots = max(config.data.max_tiles, max_images)
    self.num_slots, self.steps_per_call = slots, steps_per_call
    self.stop_ids = (tokenizer.eos_id, tokenizer.im_end_id)
    self.params = params
    model = config.model
    dmodel = dataclasses.replace(model, scan_layers=False)  # the model decode_inputs returns
    self.decode_params, cache = jax.jit(lambda p: decode_inputs(model, p, init_cache(model, 1, self.context))[1:])(
        params)
    self.slots = jax.tree.map(lambda a: jnp.zeros((slots,) + a.shape, a.dtype), cache)
    vocab = tokenizer.vocab_size
    self._prefill = jax.jit(functools.partial(_prefill_into, model=model, vocab_size=vocab,
                                              stop_ids=self.stop_ids), donate_argnums=1)
    self._decode = jax.jit(functools.partial(_decode_chunk, model=dmodel, vocab_size=vocab, stop_ids=self.stop_ids,
                                             num_steps=steps_per_call), donate_argnums=1)
    self._busy: list[_Slot | None] = [None] * slots
    self._waiting: list[Request] = []
    self._lock = threading.Condition()
    self._closing = False
    self._thread: threading.Thread | None = None
    self.cancelled = 0  # requests whose client went away

  # ----- requests

  def encode(self, turns: list[dict], images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """ChatML turns (`<image>` marks one per image, in order) -> {"input_ids" int32 [n], "tiles" [t, H, W, 3]}
    ending with the assistant's generation prompt, exactly as `generate` renders a request."""
    n_assistant = sum(t["role"] == "assistant" for t in turns)
    record = {"id": "request", "images": list(images), "caption": "",
              "turns": list(turns) + [{"role": "assistant", "content": ""}]}
    example = self.preprocessor.to_prompt(record, assistant_turn=n_assistant)
    return {"input_ids": example["input_ids"], "tiles": example["tiles"]}

  def submit(self, request: Request) -> None:
    with self._lock:
      if self._closing:
        raise EngineClosed("The server is shutting down.")
      self._waiting.append(request)
      self._lock.notify()

  def load(self) -> dict[str, int]:
    with self._lock:
      return {"slots": self.num_slots, "busy": sum(s is not None for s in self._busy),
              "waiting": len(self._waiting), "cancelled": self.cancelled}

  def compiled_programs(self) -> int:
    """Programs compiled for prefill and decode so far (constant after `warm_up`)."""
    return self._prefill._cache_size() + self._decode._cache_size()  # pylint: disable=protected-access

  # ----- device calls

  def _batch(self, request: Request) -> dict[str, np.ndarray]:
    n = len(request.input_ids)
    bucket = next(b for b in self.buckets if b >= n)
    row = packing.pad_example({"input_ids": request.input_ids, "labels": request.input_ids,
                               "tiles": request.tiles}, bucket, self.tile_slots, self.tokenizer.pad_id)
    batch = packing.collate([row])
    del batch["labels"]
    return batch

  def _start(self, slot: int, s: _Slot) -> int:
    r = s.request
    token, self.slots = self._prefill(
        self.params, self.slots, self._batch(r), np.int32(slot), np.int32(len(r.input_ids)), s.key,
        np.float32(r.temperature), np.int32(r.top_k), np.float32(r.top_p), np.int32(r.min_tokens))
    return int(token)

  def _step(self) -> np.ndarray:
    """One decode call over all slots -> tokens int32 [S, steps_per_call]."""
    busy = [s is not None for s in self._busy]
    get = lambda f, default, dtype: np.asarray([f(s) if s else default for s in self._busy], dtype)  # noqa: E731
    tokens, self.slots = self._decode(
        self.decode_params, self.slots, get(lambda s: s.ids[-1], 0, np.int32),
        get(lambda s: s.count - 1, 0, np.int32), np.stack([s.key if s else _key(0) for s in self._busy]),
        get(lambda s: s.request.temperature, 0.0, np.float32), get(lambda s: s.request.top_k, 0, np.int32),
        get(lambda s: s.request.top_p, 1.0, np.float32), get(lambda s: s.request.min_tokens, 0, np.int32),
        np.asarray(busy))
    return np.asarray(tokens)

  def warm_up(self) -> None:
    """Compiles every prefill bucket and the decode step (on dummy prompts), then clears the slots."""
    for bucket in self.buckets:
      ids = np.full([bucket], self.tokenizer.pad_id, np.int32)
      size = self.config.model.vision.image_size
      self._start(0, _Slot(Request(ids, np.zeros([0, size, size, 3], np.uint8), 1, lambda e: None), [], _key(0)))
    self._step()
    self.slots = jax.tree.map(jnp.zeros_like, self.slots)

  # ----- host-side bookkeeping

  def _advance(self, slot: int, token: int) -> None:
    """Takes slot's next token: emits the text that is final, or finishes the request."""
    s = self._busy[slot]
    r = s.request
    s.count += 1
    if s.count == 1:
      s.first_token_at = time.perf_counter()
    reason = "stop" if token in self.stop_ids else None
    if reason is None:
      s.ids.append(token)
    text = self.tokenizer.decode(s.ids)
    for stop in r.stop:
      at = text.find(stop)
      if at >= 0:
        text, reason = text[:at], "stop"
    if reason is None and s.count >= r.max_tokens:
      reason = "length"
    if reason is None:
      # Hold back an unfinished UTF-8 character and what could still become a stop string.
      hold = max([len(x) - 1 for x in r.stop] + [0])
      ready = text[:len(text) - hold] if hold else text
      if ready.endswith("\ufffd"):
        ready = ready.rstrip("\ufffd")
      if ready.startswith(s.sent) and len(ready) > len(s.sent):
        r.emit(Delta(ready[len(s.sent):]))
        s.sent = ready
      return
    if text.startswith(s.sent) and len(text) > len(s.sent):
      r.emit(Delta(text[len(s.sent):]))
    r.emit(Finish(text, tuple(s.ids), reason, len(r.input_ids), s.count, s.first_token_at))
    self._busy[slot] = None

  def _admit(self) -> None:
    while True:
      with self._lock:
        free = [i for i, s in enumerate(self._busy) if s is None]
        if not free or not self._waiting:
          return
        request = self._waiting.pop(0)
      if request.cancelled:
        self.cancelled += 1
        continue
      slot = free[0]
      self._busy[slot] = _Slot(request, [], _key(request.seed))
      self._advance(slot, self._start(slot, self._busy[slot]))

  def run(self) -> None:
    """The scheduler loop (the engine's thread): admit waiting requests into free slots, decode, repeat."""
    while True:
      with self._lock:
        for i, s in enumerate(self._busy):
          if s is not None and s.request.cancelled:
            self._busy[i] = None
            self.cancelled += 1
        idle = all(s is None for s in self._busy)
        if idle and not self._waiting:
          if self._closing:
            return
          self._lock.wait()
          continue
      try:
        self._admit()
        if any(s is not None for s in self._busy):
          tokens = self._step()
          for slot, row in enumerate(tokens):
            for token in row:
              if self._busy[slot] is None:
                break
              self._advance(slot, int(token))
      except Exception as e:  # pylint: disable=broad-except
        self._fail(e)

  def _fail(self, error: Exception) -> None:
    """A device call failed: every busy request ends with finish_reason 'error' (the server keeps running)."""
    for i, s in enumerate(self._busy):
      if s is not None:
        s.request.emit(Finish(f"{type(error).__name__}: {error}", (), "error", len(s.request.input_ids), s.count))
        self._busy[i] = None

  def start(self) -> None:
    self._thread = threading.Thread(target=self.run, name="vlm-jax-engine", daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops taking requests, finishes the ones in flight (slots and queue), joins the thread."""
    with self._lock:
      self._closing = True
      self._lock.notify()
    if self._thread is not None:
      self._thread.join()
