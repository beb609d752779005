"""Batched generation: one prefill over left-padded prompts, then a `lax.while_loop` of cached decode steps.

A request is (images, prompt): images a list of uint8 [h, w, 3] arrays, prompt a string. By default the
prompt is one user turn in ChatML followed by the generation prompt `<|im_start|>assistant\\n`, its `<image>`
placeholders expanded exactly as for training (`Preprocessor.to_prompt`; with no placeholders the images go
first, LLaVA-style). With raw=True the prompt is used verbatim, only `<image>` is expanded.

Shapes stay static so that few programs compile: the rows are rounded up to a power of two, the prompt
length to a multiple of PROMPT_BUCKET, the cache holds the prompt plus max_new_tokens, and the tile slots are
at least data.max_tiles.
Rows are left-padded (segment 0) and each row's RoPE positions start at 0 on its first real token, so every
row's next token sits in the same cache slot. A row is done once it emits eos or `<|im_end|>`; done rows keep
emitting pad (and are cut at their stop token), and the loop ends when all rows are done or after
max_new_tokens tokens. Stop tokens are not drawn before `min_new_tokens` (HF's option of that name), so a
benchmark can force every row to full length.

The decode loop runs the decoder unscanned (`decode_inputs`): the stacked layer weights (and the prefill's
stacked cache) are split into per-layer arrays once, before the loop. Inside a `while_loop` a scan slices every
layer's weights out again at each step, which made a cached step ~2x slower on CPU (bench_cpu, bf16).
With a low-precision compute dtype the decoder weights are also cast to it once there: each step then reads
half the bytes. The model casts those same params to the compute dtype at every use, so the tokens are the
same; the MoE router, which runs in float32, stays float32.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from vlm_jax.config import Config, InputError, ModelConfig
from vlm_jax.inputs import chat, examples, files, packing
from vlm_jax.inputs.images import process_image
from vlm_jax.inputs.tokenizer import IMAGE_TOKEN, Tokenizer
from vlm_jax.model.decoder import unscanned
from vlm_jax.model.vlm import VLM, init_cache
from vlm_jax.sharding import data_sharding, replicated

PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Result:
  """The generated text and its ids, without the stop token."""
  text: str
  token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise InputError(f"Need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self}.")


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next ids int32 [B] from logits f32 [B, V]: argmax, or a draw from the temperature-scaled distribution
  restricted to the top_k ids and to the smallest set of ids whose probability reaches top_p."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep an id while the mass of the ids before it is below top_p (the most likely id always stays).
    keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode_inputs(model: ModelConfig, params: Any, cache: Any) -> tuple[ModelConfig, Any, Any]:
  """(model, params, cache) for the decode loop: the decoder unscanned, its float32 weights cast to a
  low-precision compute dtype (the router excepted), as every decode step would cast them. Only the decoder
  is kept: decode steps read nothing else."""
  dtype = jnp.dtype(model.compute_dtype)

  def cast(path, leaf):
    keep = (dtype == jnp.float32 or leaf.dtype != jnp.float32
            or any(getattr(k, "key", None) == "router" for k in path))
    return leaf if keep else leaf.astype(dtype)
  decoder = jax.tree_util.tree_map_with_path(cast, params["decoder"])
  if model.scan_layers:
    decoder = unscanned(decoder, model.decoder)
    cache = {**cache, "decoder": unscanned(cache["decoder"], model.decoder)}
    model = dataclasses.replace(model, scan_layers=False)
  return model, {"decoder": decoder}, cache


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _prefill(params, batch: dict[str, jax.Array], *, model: ModelConfig, cache_len: int):
  """Left-padded prompts [B, P] -> (logits of the last slot f32 [B, V], the filled cache)."""
  cache = init_cache(model, batch["input_ids"].shape[0], cache_len)
  logits, state = VLM(model).apply({"params": params, "cache": cache}, batch, method=VLM.prefill,
                                   mutable=["cache"])
  return logits[:, -1], state["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "min_new_tokens", "sampling", "stop_ids",
                                             "pad_id", "vocab_size"))
def _decode(params, cache, first_logits: jax.Array, prompt_lengths: jax.Array, rng: jax.Array, *,
            model: ModelConfig, max_new_tokens: int, min_new_tokens: int, sampling: Sampling,
            stop_ids: tuple[int, ...], pad_id: int, vocab_size: int) -> jax.Array:
  """Samples up to max_new_tokens ids per row -> int32 [B, max_new_tokens] (pad after a row's stop token).
  Only ids below `vocab_size` (the tokenizer's) are drawn: the model's vocab may be padded beyond it; the
  stop ids are not drawn as tokens 0 .. min_new_tokens - 1."""
  batch = first_logits.shape[0]
  stops = jnp.asarray(stop_ids, jnp.int32)
  model, params, cache = decode_inputs(model, params, cache)  # once, outside the loop

  def is_stop(ids):
    return jnp.any(ids[:, None] == stops[None, :], axis=-1)

  vocab = jnp.arange(first_logits.shape[-1])
  known, stop_column = vocab < vocab_size, is_stop(vocab)

  def next_token(logits, i):
    allowed = known & ~(stop_column & (i < min_new_tokens))
    return sample(jnp.where(allowed, logits, -jnp.inf), jax.random.fold_in(rng, i), sampling)

  first = next_token(first_logits, 0)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, last, done, out = carry
    # `last` was generated at step i - 1 and sits at position prompt_length + i - 1 of its row.
    positions = (prompt_lengths + i - 1)[:, None]
    logits, state = VLM(model).apply({"params": params, "cache": cache}, last[:, None], positions,
                                     method=VLM.decode_step, mutable=["cache"])
    token = jnp.where(done, pad_id, next_token(logits[:, 0], i))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    return i + 1, state["cache"], token, done | is_stop(token), out

  carry = (jnp.asarray(1, jnp.int32), cache, first, is_stop(first), out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def read_image(path: str) -> np.ndarray:
  """An image file (local or gs://) as uint8 [h, w, 3] RGB, upright: EXIF orientation applied, as transformers'
  `load_image` does."""
  from PIL import Image, ImageOps, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  data = epath.Path(path).expanduser().read_bytes()
  # A truncated file fails in open (a cut header) or when decoded; its size tells how much is there.
  with files.reading(path, f"image of {len(data)} bytes", "give a complete image file (a truncated download?)",
                     errors=(OSError, SyntaxError, ValueError, Image.DecompressionBombError)):
    try:
      image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
      raise InputError(f"{path} is not an image PIL can read (PNG, JPEG, ...).") from e
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def params_mesh(params: Any) -> Mesh | None:
  """The mesh `params` are placed on (the training mesh: a NamedSharding over several devices), else None."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (gathered when other hosts hold parts of it)."""
  return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


class Generator:
  """Answers requests with a model: `Generator(config, params, tokenizer).generate([(images, prompt)])`.

  With params on a mesh (`workdir.load`, the train loop's eval) batches run in that mesh: every process
  prepares the same requests, the rows go over the batch axes (data, fsdp, expert) when they divide evenly
  (else every device holds them all) and every process gets the whole output."""

  def __init__(self, config: Config, params: Any, tokenizer: Tokenizer):
    self.config = config
    self.params = params
    self.mesh = params_mesh(params)
    self.tokenizer = tokenizer
    self.preprocessor = examples.Preprocessor(config, tokenizer)  # checks the image id and vocab size
    self.stop_ids = (tokenizer.eos_id, tokenizer.im_end_id)

  def encode(self, images: Sequence[np.ndarray], prompt: str, raw: bool = False) -> dict[str, np.ndarray]:
    """One request -> {"input_ids" int32 [n], "tiles" uint8 [t, H, W, 3]}, as the model will see it."""
    images = [np.asarray(im) for im in images]
    found = prompt.count(IMAGE_TOKEN)
    if found != len(images) and (raw or found):
      raise InputError(f"The prompt holds {found} {IMAGE_TOKEN} mark(s) for {len(images)} image(s): " + (
          "a raw prompt needs one mark per image, in order." if raw else
          "give one image per mark, in order, or no marks (the images then go first)."))
    if not raw:
      record = {"id": "request", "images": images, "caption": "",
                "turns": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]}
      example = self.preprocessor.to_prompt(record, assistant_turn=0)
      return {"input_ids": example["input_ids"], "tiles": example["tiles"]}
    processed = [process_image(im, self.config) for im in images]
    text = chat.expand_images([{"role": "user", "content": prompt}], [p.prompt for p in processed])[0]["content"]
    size = self.config.model.vision.image_size
    tiles = (np.concatenate([p.tiles for p in processed]) if processed
             else np.zeros([0, size, size, 3], np.uint8))
    return {"input_ids": np.asarray(self.tokenizer.encode(text), np.int32), "tiles": tiles}

  def batch(self, encoded: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Encoded requests -> a left-padded batch [B, P] (P rounded up to PROMPT_BUCKET) with tile slots
    [B, N, H, W, 3], N = max(data.max_tiles, most tiles of a request)."""
    longest = max(len(e["input_ids"]) for e in encoded)
    seq_len = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    max_tiles = max([self.config.data.max_tiles] + [len(e["tiles"]) for e in encoded])
    rows = [packing.pad_example({**e, "labels": e["input_ids"]}, seq_len, max_tiles, self.tokenizer.pad_id,
                                padding_side="left") for e in encoded]
    batch = packing.collate(rows)
    del batch["labels"]
    return batch

  def prepare(self, requests: Sequence[tuple[Sequence[np.ndarray], str]], raw: bool = False) -> dict[str, np.ndarray]:
    """Requests -> the batch `run` takes: rows rounded up to a power of two with copies of the first request
    (few shapes compile; `run`'s extra rows are to be dropped), left-padded as in `batch`."""
    encoded = [self.encode(ims, prompt, raw) for ims, prompt in requests]
    rows = 1 << (len(encoded) - 1).bit_length()
    return self.batch(encoded + encoded[:1] * (rows - len(encoded)))

  def place(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Host arrays (the same on every process) -> global arrays on the params' mesh: the leading (row) axis over
    the batch axes when it divides evenly, else replicated. Unchanged without a mesh."""
    if self.mesh is None:
      return arrays
    shards = math.prod(self.mesh.shape[a] for a in data_sharding(self.mesh, 1).spec[0])

    def put(v):
      v = np.asarray(v)
      even = v.ndim > 0 and v.shape[0] % shards == 0
      return jax.make_array_from_process_local_data(data_sharding(self.mesh, v.ndim) if even
                                                    else replicated(self.mesh), v, v.shape)
    return {k: put(v) for k, v in arrays.items()}

  def run(self, batch: dict[str, np.ndarray], *, max_new_tokens: int = 32, min_new_tokens: int = 0,
          sampling: Sampling = Sampling(), seed: int = 0) -> np.ndarray:
    """Prefill + decode of a prepared batch -> ids int32 [B, max_new_tokens], pad after a row's stop token
    (the stop token itself is kept). No stop token before min_new_tokens."""
    logits, cache = self.prefill(batch, max_new_tokens)
    return to_host(self.decode(batch, logits, cache, max_new_tokens=max_new_tokens,
                               min_new_tokens=min_new_tokens, sampling=sampling, seed=seed))

  def prefill(self, batch: dict[str, np.ndarray], max_new_tokens: int) -> tuple[jax.Array, Any]:
    """The prompts of a prepared batch -> (last-slot logits f32 [B, V], a cache with room for max_new_tokens)."""
    if max_new_tokens < 1:
      raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    return _prefill(self.params, self.place(batch), model=self.config.model,
                    cache_len=batch["input_ids"].shape[1] + max_new_tokens)

  def decode(self, batch: dict[str, np.ndarray], logits: jax.Array, cache: Any, *, max_new_tokens: int,
             min_new_tokens: int = 0, sampling: Sampling = Sampling(), seed: int = 0) -> jax.Array:
    """From `prefill`'s outputs: the first token from its logits, then up to max_new_tokens - 1 cached decode
    steps -> ids int32 [B, max_new_tokens] (on device)."""
    prompt_lengths = self.place({"n": (np.asarray(batch["segment_ids"]) > 0).sum(axis=1).astype(np.int32)})["n"]
    return _decode(self.params, cache, logits, prompt_lengths, jax.random.key(seed), model=self.config.model,
                   max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, sampling=sampling,
                   stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_id, vocab_size=self.tokenizer.vocab_size)

  def generate(self, requests: Sequence[tuple[Sequence[np.ndarray], str]], *, max_new_tokens: int = 32,
               min_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, raw: bool = False) -> list[Result]:
    """Generates for every request (in one batch); returns one Result per request, in order."""
    if not requests:
      return []
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    out = self.run(self.prepare(requests, raw), max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                   sampling=sampling, seed=seed)
    results = []
    for row in out[:len(requests)]:
      stop = np.flatnonzero(np.isin(row, self.stop_ids))
      ids = [int(i) for i in row[:stop[0] if len(stop) else len(row)]]
      results.append(Result(self.tokenizer.decode(ids), ids))
    return results
