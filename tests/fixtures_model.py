"""Model-test inputs shared by tests/test_vlm.py and tests/test_moe.py: hand-placed token rows, batches, a cached
jitted apply, the KV-cache decode check and a sharded loss/grads step that checks its activations stay sharded."""
import functools
import re

import jax
import numpy as np
from fixtures_numerics import assert_f32_close

from vlm_jax import sharding
from vlm_jax.losses import IGNORE_ID
from vlm_jax.model.vlm import VLM, init_cache
from vlm_jax.train.step import use_mesh

IMG = 4  # <image> id


def random_pixels(*shape, seed=0, size=16):
  """f32 [*shape, size, size, 3] standard normal tiles."""
  return np.random.RandomState(seed).randn(*shape, size, size, 3).astype(np.float32)


def make_row(tokens, length, offset=0):
  """(ids, segments, positions) int32 [length] of `tokens` placed at `offset` in a row of `length` (rest padding)."""
  ids, seg, pos = (np.zeros(length, np.int32) for _ in range(3))
  ids[offset:offset + len(tokens)] = tokens
  seg[offset:offset + len(tokens)] = 1
  pos[offset:offset + len(tokens)] = np.arange(len(tokens))
  return ids, seg, pos


def make_batch(rows, pixels, tile_mask):
  """A model batch (DESIGN.md) of `make_row` rows, labels on every real token; pixels [B, N, H, W, 3]."""
  ids, seg, pos = (np.stack(a) for a in zip(*rows))
  return {"input_ids": ids, "segment_ids": seg, "positions": pos, "pixel_values": pixels,
          "tile_mask": np.asarray(tile_mask, bool), "labels": np.where(seg > 0, ids, IGNORE_ID)}


@functools.cache
def jit_apply(cfg, **kw):
  return jax.jit(functools.partial(VLM(cfg).apply, **kw))


def assert_decode_equals_full_forward(cfg, params, full, prompt_len, cache_len):
  """Prefills `full`'s first prompt_len positions into a KV cache of cache_len slots, then decodes the rest one
  token at a time: the logits of every real prompt position and every decode step equal the full forward's
  (to float32 rounding: fixtures_numerics). -> the final cache state."""
  reference = np.asarray(jit_apply(cfg)({"params": params}, full)["logits"])
  prompt = {k: (v[:, :prompt_len] if k in ("input_ids", "segment_ids", "positions") else v) for k, v in full.items()}
  cache = init_cache(cfg, batch_size=full["input_ids"].shape[0], max_len=cache_len)
  logits, state = jit_apply(cfg, method=VLM.prefill, mutable=("cache",))({"params": params, "cache": cache}, prompt)
  real = full["segment_ids"][:, :prompt_len] > 0
  assert_f32_close(np.asarray(logits)[real], reference[:, :prompt_len][real])
  step = jit_apply(cfg, method=VLM.decode_step, mutable=("cache",))
  for t in range(prompt_len, full["input_ids"].shape[1]):
    logits, state = step({"params": params, **state}, full["input_ids"][:, t:t + 1], full["positions"][:, t:t + 1])
    assert_f32_close(np.asarray(logits)[:, 0], reference[:, t])
  return state


def sharded_value_and_grad(loss_fn, params, batch, mesh, param_shardings, has_aux=False, allow_trailing=()):
  """jax.value_and_grad(loss_fn, has_aux)(params, batch) jitted on `mesh`: params placed by `param_shardings`, the
  batch over the batch axes. -> (value, replicated; grads, sharded like the params).

  The compiled program gathers no whole-batch activation: no collective in its HLO yields a [B, S, ...] array
  (the [B, S, V] logits, the [B, S, D] hidden states) for the batch's global B and S, except [B, S, *t] for the
  trailing shapes t in `allow_trailing`."""
  batch_shardings = {k: sharding.data_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  with use_mesh(mesh):
    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=has_aux), in_shardings=(param_shardings, batch_shardings),
                 out_shardings=(sharding.replicated(mesh), param_shardings))
    args = jax.device_put(params, param_shardings), jax.device_put(batch, batch_shardings)
    compiled = fn.lower(*args).compile()
    found = whole_batch_collectives(compiled.as_text(), *batch["input_ids"].shape, allow_trailing)
    assert found == [], f"whole-batch collectives in the sharded program: {found}"
    return compiled(*args)


def whole_batch_collectives(hlo: str, batch_size: int, seq_len: int, allow_trailing=()) -> list[str]:
  """The all-gathers / all-reduces / all-to-alls of a compiled (per-device) HLO text whose result has the leading
  dims [batch_size, seq_len]: each is an activation brought whole onto every device of the batch axes."""
  found = []
  for line in hlo.splitlines():
    op = re.search(r"= (.*?) (all-gather|all-reduce|all-to-all)(-start)?\(", line)
    if op:
      for dims in re.findall(r"\w+\[([\d,]+)\]", op.group(1)):
        shape = tuple(int(d) for d in dims.split(","))
        if shape[:2] == (batch_size, seq_len) and shape[2:] not in allow_trailing:
          found.append(f"{op.group(2)} -> {shape}")
  return found
