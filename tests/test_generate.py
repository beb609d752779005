"""Generation: prompts as in training, KV-cached greedy decoding equal to full recomputation, left-padded
batches equal prompts alone, stop tokens, sampling."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_data import assert_upright, save_sideways_jpeg
from fixtures_workdir import tiny_config

from vlm_jax.config import MoeConfig
from vlm_jax.generate import Generator, Sampling, decode_inputs, read_image, sample
from vlm_jax.inputs.tokenizer import train_sentencepiece
from vlm_jax.model.vlm import VLM, init_cache, init_params

SENTENCES = ["What colour is the circle?", "The red square is on the left.", "How many shapes are there? three",
             "Is there a blue star? yes", "a small green triangle at the top"] * 5
T = 4  # <image> tokens per tile: 16 px images, patch 8


@functools.cache
def tokenizer():
  return train_sentencepiece(SENTENCES, 400)


@functools.cache
def setup():
  tok = tokenizer()
  config = tiny_config(tok.vocab_size)
  return config, init_params(config.model, jax.random.key(0)), tok


def image(h, w, seed):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


REQUESTS = [([], "How many shapes are there?"),
            ([image(20, 30, 1)], "<image>\nWhat colour is the circle?"),
            ([image(16, 16, 2), image(40, 24, 3)], "Is there a blue star?")]


@functools.cache
def _forward(model):
  return jax.jit(lambda p, b: VLM(model).apply({"params": p}, b)["logits"])


def reference(generator: Generator, params, images, prompt, max_new_tokens, length=64, vocab=None):
  """Greedy decoding by full recomputation: the whole (right-padded, unpadded at the left) sequence through
  the model's plain forward pass for every new token, stopping at eos / <|im_end|>; ids < vocab if given."""
  encoded = generator.encode(images, prompt)
  ids = [int(i) for i in encoded["input_ids"]]
  n_prompt = len(ids)
  tiles = np.zeros((2, 16, 16, 3), np.uint8)  # as the loader ships them: the model normalizes
  tiles[:len(encoded["tiles"])] = encoded["tiles"]
  for _ in range(max_new_tokens):
    n = len(ids)
    batch = {"input_ids": np.zeros((1, length), np.int32), "segment_ids": np.zeros((1, length), np.int32),
             "positions": np.zeros((1, length), np.int32), "pixel_values": tiles[None],
             "tile_mask": (np.arange(2) < len(encoded["tiles"]))[None]}
    batch["input_ids"][0, :n] = ids
    batch["segment_ids"][0, :n] = 1
    batch["positions"][0, :n] = np.arange(n)
    token = int(np.argmax(np.asarray(_forward(generator.config.model)(params, batch))[0, n - 1, :vocab]))
    if token in generator.stop_ids:
      break
    ids.append(token)
  return ids[n_prompt:]


def test_prompts_render_like_training():
  config, params, tok = setup()
  gen = Generator(config, params, tok)
  img = "<image>" * T
  chat = gen.encode(REQUESTS[1][0], REQUESTS[1][1])
  assert tok.decode(chat["input_ids"]) == (f"<|im_start|>user\n{img}\nWhat colour is the circle?<|im_end|>\n"
                                           "<|im_start|>assistant\n")
  assert chat["tiles"].shape == (1, 16, 16, 3) and chat["tiles"].dtype == np.uint8
  # No placeholders: the images go first, one `<image>\n` each (LLaVA-style), as the processor does.
  both = gen.encode(REQUESTS[2][0], REQUESTS[2][1])
  assert tok.decode(both["input_ids"]) == (f"<|im_start|>user\n{img}\n{img}\nIs there a blue star?<|im_end|>\n"
                                           "<|im_start|>assistant\n")
  assert both["tiles"].shape == (2, 16, 16, 3)
  raw = gen.encode(REQUESTS[1][0], "<image> The circle is", raw=True)
  assert tok.decode(raw["input_ids"]) == f"{img} The circle is"
  np.testing.assert_array_equal(raw["tiles"], chat["tiles"])
  with pytest.raises(ValueError, match=r"The prompt holds 1 <image> mark\(s\) for 2 image\(s\): a raw prompt "
                                       r"needs one mark per image"):
    gen.encode(REQUESTS[2][0], "<image> only one", raw=True)


def test_left_padded_batch():
  config, params, tok = setup()
  gen = Generator(config, params, tok)
  encoded = [gen.encode(*r) for r in REQUESTS]
  batch = gen.batch(encoded)
  lengths = [len(e["input_ids"]) for e in encoded]
  width = -(-max(lengths) // 16) * 16
  assert batch["input_ids"].shape == (3, width) and batch["pixel_values"].shape == (3, 2, 16, 16, 3)
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(batch["input_ids"][b, width - n:], encoded[b]["input_ids"])
    np.testing.assert_array_equal(batch["input_ids"][b, :width - n], tok.pad_id)
    np.testing.assert_array_equal(batch["segment_ids"][b], np.arange(width) >= width - n)
    np.testing.assert_array_equal(batch["positions"][b, width - n:], np.arange(n))
  np.testing.assert_array_equal(batch["tile_mask"], [[False, False], [True, False], [True, True]])


def test_greedy_with_cache_equals_full_recomputation_and_batch_equals_alone():
  config, params, tok = setup()
  gen = Generator(config, params, tok)
  expected = [reference(gen, params, ims, prompt, 8) for ims, prompt in REQUESTS]
  assert [len(e) for e in expected] == [8, 8, 8]  # no early stop: every step is compared
  batched = gen.generate(REQUESTS, max_new_tokens=8)
  assert [r.token_ids for r in batched] == expected
  for request, want in zip(REQUESTS, expected):
    alone = gen.generate([request], max_new_tokens=8)[0]
    assert alone.token_ids == want
    assert alone.text == tok.decode(want)
  assert len({tuple(e) for e in expected}) == 3  # the rows really differ


@pytest.mark.parametrize("overrides", [
    dict(dtype="bfloat16"),  # the decode loop casts the weights to bf16 once, as every step would
    dict(moe=MoeConfig(num_experts=4, experts_per_token=2, every_n_layers=2)),  # scanned groups -> layers_i
    dict(scan_layers=False),
])
def test_decode_loop_equals_full_recomputation(overrides):
  """The decode loop runs the decoder unscanned with pre-cast weights (generate.decode_inputs): its greedy
  tokens still equal the plain (scanned, float32-param) forward pass of the same model."""
  config, _, tok = setup()
  moe = overrides.pop("moe", None)
  model = dataclasses.replace(config.model, **overrides)
  if moe is not None:
    model = dataclasses.replace(model, decoder=dataclasses.replace(model.decoder, num_layers=4, moe=moe))
  config = dataclasses.replace(config, model=model)
  params = init_params(model, jax.random.key(7))
  gen = Generator(config, params, tok)
  expected = [reference(gen, params, ims, prompt, 6) for ims, prompt in REQUESTS]
  assert [len(e) for e in expected] == [6, 6, 6]
  assert [r.token_ids for r in gen.generate(REQUESTS, max_new_tokens=6)] == expected


def test_decode_inputs_split_layers_and_cast_weights():
  config, params, _ = setup()
  bf16 = dataclasses.replace(config.model, dtype="bfloat16")
  cache = init_cache(bf16, 2, 8)
  model, decoder_params, decoder_cache = decode_inputs(bf16, params, cache)
  assert not model.scan_layers and set(decoder_params) == {"decoder"}
  layer = decoder_params["decoder"]["layers_1"]["mlp"]["up"]["kernel"]
  assert layer.dtype == jnp.bfloat16
  np.testing.assert_array_equal(layer, params["decoder"]["layers"]["mlp"]["up"]["kernel"][1].astype(jnp.bfloat16))
  assert decoder_cache["decoder"]["layers_0"]["attn"]["key"].shape == (
      cache["decoder"]["layers"]["attn"]["key"].shape[1:])


def test_rows_and_prompt_lengths_are_bucketed():
  config, params, tok = setup()
  gen = Generator(config, params, tok)
  from vlm_jax import generate
  first = gen.generate(REQUESTS, max_new_tokens=5)
  compiled = generate._prefill._cache_size(), generate._decode._cache_size()  # pylint: disable=protected-access
  # 4 rows share the 3-row program (3 -> 4); a slightly longer prompt stays in the same 16-token bucket.
  more = gen.generate(REQUESTS + [(REQUESTS[1][0], REQUESTS[1][1] + " Yes?")], max_new_tokens=5)
  assert (generate._prefill._cache_size(), generate._decode._cache_size()) == compiled
  assert [r.token_ids for r in more[:3]] == [r.token_ids for r in first] and len(more) == 4


def swap_columns(params, a, b):
  """Params whose lm_head scores id a as it scored id b and vice versa."""
  kernel = params["decoder"]["lm_head"]["kernel"]
  swapped = kernel.at[:, [a, b]].set(kernel[:, [b, a]])
  return {**params, "decoder": {**params["decoder"], "lm_head": {"kernel": swapped}}}


def test_stop_tokens():
  config, params, tok = setup()
  gen = Generator(config, params, tok)
  free = gen.generate(REQUESTS, max_new_tokens=8)
  first = free[0].token_ids
  # eos takes the place of the first greedy token: the answer is empty.
  eos_first = Generator(config, swap_columns(params, first[0], tok.eos_id), tok)
  empty = eos_first.generate(REQUESTS[:1], max_new_tokens=8)[0]
  assert empty.token_ids == [] and empty.text == ""
  # <|im_end|> takes the place of a later token of row 0: row 0 stops there while the other rows go on.
  k = next(i for i in range(1, 8) if first[i] not in first[:i])
  stopped = swap_columns(params, first[k], tok.im_end_id)
  out = Generator(config, stopped, tok).generate(REQUESTS, max_new_tokens=8)
  assert out[0].token_ids == first[:k]
  assert [r.token_ids for r in out] == [reference(gen, stopped, ims, p, 8) for ims, p in REQUESTS]
  assert max(len(r.token_ids) for r in out) > k  # a finished row rode along while others decoded
  # max_new_tokens caps the length.
  assert [r.token_ids for r in gen.generate(REQUESTS, max_new_tokens=3)] == [r.token_ids[:3] for r in free]


def test_min_new_tokens_bars_stop_tokens():
  config, params, tok = setup()
  first = Generator(config, params, tok).generate(REQUESTS[:1], max_new_tokens=8)[0].token_ids
  eos_first = Generator(config, swap_columns(params, first[0], tok.eos_id), tok)
  assert eos_first.generate(REQUESTS[:1], max_new_tokens=8)[0].token_ids == []
  forced = eos_first.generate(REQUESTS[:1], max_new_tokens=8, min_new_tokens=8)[0].token_ids
  assert len(forced) == 8 and not set(forced) & {tok.eos_id, tok.im_end_id}


def test_ids_beyond_the_tokenizer_are_never_generated():
  _, _, tok = setup()
  vocab = tok.vocab_size
  config = tiny_config(vocab + 10)  # a model vocab padded beyond the tokenizer's
  params = init_params(config.model, jax.random.key(1))
  gen = Generator(config, params, tok)
  first = reference(gen, params, *REQUESTS[1], 1, vocab=vocab)[0]
  # The padded ids score 3x the best real id: unrestricted argmax would pick them.
  kernel = params["decoder"]["lm_head"]["kernel"]
  kernel = kernel.at[:, vocab:].set(3 * kernel[:, first:first + 1])
  params = {**params, "decoder": {**params["decoder"], "lm_head": {"kernel": kernel}}}
  assert reference(gen, params, *REQUESTS[1], 1)[0] >= vocab
  gen = Generator(config, params, tok)
  out = gen.generate(REQUESTS, max_new_tokens=6)
  assert [r.token_ids for r in out] == [reference(gen, params, ims, p, 6, vocab=vocab) for ims, p in REQUESTS]
  assert all(0 <= i < vocab for r in out for i in r.token_ids) and sum(len(r.token_ids) for r in out) > 0
  sampled = gen.generate(REQUESTS, max_new_tokens=6, temperature=2.0, seed=5)
  assert all(0 <= i < vocab for r in sampled for i in r.token_ids)


def test_sampling_seeds_and_top_k_one():
  config, params, tok = setup()
  gen = Generator(config, params, tok)
  greedy = [r.token_ids for r in gen.generate(REQUESTS, max_new_tokens=8)]

  def run(**kw):
    return [r.token_ids for r in gen.generate(REQUESTS, max_new_tokens=8, **kw)]
  a, again, other = run(temperature=1.0, seed=1), run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
  assert a == again
  assert a != other and a != greedy
  assert run(temperature=1.0, top_k=1, seed=3) == greedy
  assert run(temperature=0.7, top_p=1e-6, seed=4) == greedy


def test_sample_restricts_to_top_k_and_top_p():
  probs = np.array([0.4, 0.3, 0.2, 0.1])
  logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 1))
  rng = jax.random.key(0)

  def frequencies(sampling):
    ids = np.asarray(sample(logits, rng, sampling))
    return np.bincount(ids, minlength=4) / len(ids)
  # 4000 draws: the standard error of a kept id's frequency is <= 0.008, so 0.03 is ~4 sigma. An excluded id
  # must never be drawn: a leak of even 0.1% of the mass would show up ~4 times.
  def assert_restricted(sampling, kept):
    freq = frequencies(sampling)
    np.testing.assert_array_equal(freq[len(kept):], 0.0, err_msg=str(sampling))
    np.testing.assert_allclose(freq[:len(kept)], kept, atol=0.03, err_msg=str(sampling))
  np.testing.assert_allclose(frequencies(Sampling(1.0)), probs, atol=0.03)
  assert_restricted(Sampling(1.0, top_k=2), [4 / 7, 3 / 7])
  assert_restricted(Sampling(1.0, top_p=0.6), [4 / 7, 3 / 7])
  assert_restricted(Sampling(1.0, top_p=0.75), [4 / 9, 3 / 9, 2 / 9])
  assert_restricted(Sampling(1.0, top_k=3, top_p=0.6), [4 / 7, 3 / 7])  # both: the smaller set
  assert_restricted(Sampling(0.5, top_k=1), [1.0])
  assert frequencies(Sampling(0.0)).tolist() == [1.0, 0, 0, 0]
  sharp = frequencies(Sampling(0.25))  # p^4 renormalized
  np.testing.assert_allclose(sharp, probs ** 4 / (probs ** 4).sum(), atol=0.03)
  with pytest.raises(ValueError, match="top_p"):
    Sampling(1.0, top_p=0.0)


def test_read_image_applies_exif_orientation(tmp_path):
  path = tmp_path / save_sideways_jpeg(tmp_path / "sideways.jpg")
  assert_upright(read_image(str(path)), path)
