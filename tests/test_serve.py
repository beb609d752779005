"""`vlm-jax serve` with the official openai client: answers equal `vlm-jax generate`, alone and among 32 clients;
streaming, stop strings, disconnects, bad input, constant compile count, SIGTERM. One server for the module."""
import concurrent.futures
import http.client
import json
import signal
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from fixtures_serve import SLOTS, png_data_url, served  # noqa: F401  (pytest fixture)
from PIL import Image

from vlm_jax import cli, workdir
from vlm_jax.generate import Generator, Sampling, sample
from vlm_jax.inputs import examples
from vlm_jax.serve.engine import sample_rows

RNG = np.random.RandomState(0)
IMAGES = [RNG.randint(0, 256, (20, 30, 3)).astype(np.uint8), RNG.randint(0, 256, (48, 64, 3)).astype(np.uint8),
          RNG.randint(0, 256, (16, 16, 3)).astype(np.uint8)]
QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Is there a square on the left?",
             "There are 3 shapes. " * 6 + "Is there a red star?"]


@pytest.fixture(scope="module")
def generator(served):
  return Generator(*workdir.load(served[0]))


@pytest.fixture(scope="module")
def client(served):
  return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=300)


def _user(images, text):
  """The message `vlm-jax generate --image ... --prompt text` sends: images first, then the text."""
  return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images]
          + [{"type": "text", "text": text}]}


def _health(url):
  with urllib.request.urlopen(url + "/health") as r:
    return json.loads(r.read())


def _post(url, body: bytes | str, path="/v1/chat/completions"):
  """-> (status, parsed JSON) of a raw POST (for bodies the openai client would not send)."""
  data = body.encode() if isinstance(body, str) else body
  req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _stream(client, **kw):
  """-> (joined text, chunks) of a streamed answer."""
  chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
  return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_sample_rows_draws_what_generate_sample_draws_for_each_row():
  """The engine's per-row settings (arrays) draw what generate's static Sampling draws for a batch of one."""
  logits = jax.random.normal(jax.random.key(1), (3, 50))
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 2))(jnp.arange(3))
  draws = set()
  for t, k, p in [(0.0, 0, 1.0), (1.5, 20, 0.9), (1.0, 5, 0.3)]:
    got = sample_rows(logits, keys, jnp.full(3, t), jnp.full(3, k, jnp.int32), jnp.full(3, p))
    want = [int(sample(logits[i:i + 1], keys[i], Sampling(t, k, p))[0]) for i in range(3)]
    assert [int(g) for g in got] == want, (t, k, p)
    draws.add(tuple(want))
  mixed = sample_rows(logits, keys, jnp.asarray([0.0, 1.5, 0.7]), jnp.asarray([0, 20, 0]),
                      jnp.asarray([1.0, 0.9, 0.5]))
  assert [int(m) for m in mixed] == [int(sample(logits[i:i + 1], keys[i], Sampling(*c))[0]) for i, c in
                                     enumerate([(0.0, 0, 1.0), (1.5, 20, 0.9), (0.7, 0, 0.5)])]
  assert len(draws) >= 2  # sampling draws other ids than argmax


def test_plain_and_streamed_answers_equal_generate(served, client, generator, tmp_path, capsys):
  w, url, _ = served
  path = tmp_path / "a.png"
  Image.fromarray(IMAGES[0]).save(path)
  assert cli.main(["generate", "--workdir", str(w), "--image", str(path), "--prompt", QUESTIONS[0],
                   "--max-new-tokens", "9", "--json"]) == 0
  want = json.loads(capsys.readouterr().out)
  assert want["token_ids"]
  messages = [_user(IMAGES[:1], QUESTIONS[0])]
  got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9)
  assert got.choices[0].message.content == want["text"] and got.choices[0].message.role == "assistant"
  stopped = len(want["token_ids"]) < 9
  assert got.choices[0].finish_reason == ("stop" if stopped else "length")
  assert got.usage.completion_tokens == len(want["token_ids"]) + stopped and got.usage.prompt_tokens > 4

  text, chunks = _stream(client, messages=messages, max_completion_tokens=9, stream_options={"include_usage": True})
  assert text == want["text"] and len(chunks) >= 4
  assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == (
      got.choices[0].finish_reason)
  assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == got.usage.model_dump()
  assert all(c.usage is None for c in chunks[:-1])

  # A local path (the server runs with --allow-local-files) is the same image.
  local = client.chat.completions.create(model="tiny", max_tokens=9, messages=[{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": QUESTIONS[0]}]}])
  assert local.choices[0].message.content == want["text"]
  # So is a lossless WebP; a JPEG is read too (lossy: other pixels, same prompt length); a GIF is refused.
  answers = {}
  for fmt, save in (("WEBP", {"lossless": True}), ("JPEG", {"quality": 90})):
    answers[fmt] = client.chat.completions.create(model="tiny", max_tokens=9, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(IMAGES[0], fmt, **save)}},
        {"type": "text", "text": QUESTIONS[0]}]}])
  assert answers["WEBP"].choices[0].message.content == want["text"]
  assert answers["JPEG"].usage.prompt_tokens == local.usage.prompt_tokens
  with pytest.raises(openai.BadRequestError, match="Images must be PNG, JPEG or WebP; got GIF"):
    client.chat.completions.create(model="tiny", messages=[_user([], "x")] + [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(IMAGES[0], "GIF")}}]}])

  # Seeded sampling draws what generate draws.
  sampled = generator.generate([(IMAGES[1:3], QUESTIONS[2])], max_new_tokens=8, temperature=1.5, top_k=20,
                               top_p=0.9, seed=3)[0]
  got = client.chat.completions.create(model="tiny", messages=[_user(IMAGES[1:3], QUESTIONS[2])], max_tokens=8,
                                       temperature=1.5, top_p=0.9, seed=3, extra_body={"top_k": 20})
  assert got.choices[0].message.content == sampled.text

  # A stop string cuts the answer before it.
  greedy = generator.generate([([], QUESTIONS[1])], max_new_tokens=12)[0].text
  stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
  assert len(stop) == 2
  got = client.chat.completions.create(model="tiny", messages=[_user([], QUESTIONS[1])], max_tokens=12, stop=[stop])
  assert got.choices[0].message.content == greedy[:greedy.find(stop)] and got.choices[0].finish_reason == "stop"
  text, chunks = _stream(client, messages=[_user([], QUESTIONS[1])], max_tokens=12, stop=stop)
  assert text == greedy[:greedy.find(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_multi_turn_with_a_system_message(served, client, generator):
  turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "<image>\n" + QUESTIONS[0]},
           {"role": "assistant", "content": "It is red."}, {"role": "user", "content": "<image>\n" + QUESTIONS[1]}]
  record = {"id": "r", "images": IMAGES[:2], "caption": "", "turns": turns + [{"role": "assistant", "content": ""}]}
  prompt = examples.Preprocessor(generator.config, generator.tokenizer).to_prompt(record, assistant_turn=1)
  ids = generator.run(generator.batch([prompt]), max_new_tokens=7)[0]
  stop = np.flatnonzero(np.isin(ids, generator.stop_ids))
  want = generator.tokenizer.decode([int(i) for i in ids[:stop[0] if len(stop) else 7]])
  messages = [turns[0], _user(IMAGES[:1], QUESTIONS[0]), turns[2], _user(IMAGES[1:2], QUESTIONS[1])]
  got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7)
  assert got.choices[0].message.content == want


def test_32_concurrent_clients_get_their_single_request_answers(served, client, generator):
  """8 different requests (0-2 images, short and long prompts), 4 clients each with different max_tokens, half
  streamed, all at once over 4 slots. Each answer is generate's for that request alone: its first max_tokens."""
  url = served[1]
  compiled = _health(url)["compiled_programs"]
  kinds = [(IMAGES[i % 2:i % 2 + i % 3], QUESTIONS[i % 4]) for i in range(8)]
  want = [generator.generate([k], max_new_tokens=14)[0] for k in kinds]
  jobs = [(i % 8, (3, 9, 14, 6)[i // 8], i % 2 == 0) for i in range(32)]

  def ask(job):
    kind, max_tokens, stream = job
    messages = [_user(*kinds[kind])]
    if stream:
      return _stream(client, messages=messages, max_tokens=max_tokens)[0]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens).choices[0].message.content

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(ask, jobs))
  for (kind, max_tokens, _), answer in zip(jobs, answers):
    assert answer == generator.tokenizer.decode(want[kind].token_ids[:max_tokens]), (kind, max_tokens)
  assert len({a for a in answers}) > 8  # the requests differ
  health = _health(url)
  assert health["compiled_programs"] == compiled == 6  # 5 prompt buckets + the decode step, all at start-up
  assert health["busy"] == health["waiting"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, client):
  url = served[1]
  before = _health(url)["cancelled"]
  host, port = url.removeprefix("http://").split(":")
  conn = http.client.HTTPConnection(host, int(port))
  body = {"model": "tiny", "messages": [_user([], QUESTIONS[0])], "max_tokens": 200, "stream": True}
  conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
  response = conn.getresponse()
  assert response.status == 200 and response.readline().startswith(b"data: {")
  conn.sock.close()
  conn.close()
  deadline = time.time() + 30
  while (health := _health(url))["cancelled"] == before and time.time() < deadline:
    time.sleep(0.05)
  assert health["cancelled"] == before + 1 and health["busy"] == 0
  # Every slot serves again.
  with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
    done = list(pool.map(lambda _: client.chat.completions.create(
        model="tiny", messages=[_user([], QUESTIONS[1])], max_tokens=3).choices[0].finish_reason, range(SLOTS)))
  assert set(done) <= {"stop", "length"} and len(done) == SLOTS


def test_bad_input_gets_a_4xx_saying_what_is_wrong(served, client, tmp_path):
  url = served[1]
  ok = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

  def body(**kw):
    return json.dumps({**ok, **kw})

  def image(url_):
    return body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_}},
                                                         {"type": "text", "text": "What?"}]}])
  big = np.zeros((7100, 7100, 3), np.uint8)  # 50.4 megapixels (a PNG of zeros is small)
  cases = [
      (image("data:image/png;base64,@@not base64@@"), 400, "invalid base64", "invalid_image"),
      (image("data:image/png;base64,aGVsbG8gd29ybGQ="), 400, "not an image", "invalid_image"),
      (image(png_data_url(big)), 400, "7100x7100 (50.4 megapixels)", "image_too_large"),
      (image("https://example.com/cat.png"), 400, "the server fetches nothing", "invalid_image_url"),
      (body(messages=[_user(IMAGES[:1] * 5, "Many?")]), 400, "more than 4 images", "too_many_images"),
      (body(messages=[{"role": "user", "content": "many words " * 200}]), 400,
       "the model's context holds 256", "context_length_exceeded"),
      (body(max_tokens=250), 400, "ask for at most", "context_length_exceeded"),
      (body(model="gpt-4o"), 404, "The model 'gpt-4o' does not exist: this server serves 'tiny'", "model_not_found"),
      ('{"model": "tiny", "messages": [', 400, "not valid JSON", "invalid_json"),
      (body(messages=[]), 400, "'messages' must be a non-empty list", "missing"),
      (json.dumps({"model": "tiny"}), 400, "'messages' must be a non-empty list", "missing"),
      (body(max_tokens="ten"), 400, "'max_tokens' must be an integer, got 'ten'", "invalid_type"),
      (body(temperature="hot"), 400, "'temperature' must be a number", "invalid_type"),
      (body(messages=[{"role": "user", "content": 5}]), 400, "'messages[0].content' must be a string",
       "invalid_type"),
      (body(messages=[{"role": "robot", "content": "Hi"}]), 400, "role one of system, user, assistant",
       "invalid_value"),
      (body(n=2), 400, "Only n=1", "invalid_value"),
      (body(top_p=0), 400, "'top_p' must be > 0", "invalid_value"),
  ]
  for data, status, message, code in cases:
    got_status, got = _post(url, data)
    assert (got_status, got["error"]["code"]) == (status, code), (message, got)
    assert message in got["error"]["message"] and set(got["error"]) == {"message", "type", "param", "code"}
  # The openai client raises its typed errors with the same message.
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    client.chat.completions.create(model="gpt-4o", messages=ok["messages"])
  with pytest.raises(openai.BadRequestError, match="invalid base64") as e:
    client.chat.completions.create(model="tiny", messages=json.loads(image("data:image/png;base64,@@"))["messages"])
  assert e.value.status_code == 400 and e.value.param == "messages[0].content[0].image_url.url"
  assert _post(url, "{}", path="/v1/nowhere")[0] == 404
  # The server still answers.
  assert client.chat.completions.create(model="tiny", **{k: v for k, v in ok.items() if k != "model"}
                                        ).choices[0].finish_reason in ("stop", "length")


def test_models_and_health(served, client):
  assert [m.id for m in client.models.list().data] == ["tiny"]
  health = _health(served[1])
  assert health["status"] == "ok" and health["slots"] == SLOTS and health["model"] == "tiny"


def test_sigterm_finishes_the_requests_in_flight_then_exits(served, client):
  """Runs last: it stops the module's server."""
  _, url, proc = served
  stream = client.chat.completions.create(model="tiny", messages=[_user([], QUESTIONS[0])], max_tokens=120,
                                          stream=True, stream_options={"include_usage": True})
  chunks = [next(stream)]
  proc.send_signal(signal.SIGTERM)
  chunks += list(stream)
  reason = chunks[-2].choices[0].finish_reason
  assert reason == "stop" or (reason == "length" and chunks[-1].usage.completion_tokens == 120)
  assert proc.wait(timeout=60) == 0
  with pytest.raises(OSError):
    _health(url)
