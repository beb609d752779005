"""Generation and evaluation inside the training mesh: a batch of params on a mesh goes over the batch axes (the
tokens equal those of unplaced params), and only process 0 writes the eval files."""
import json

import jax
import numpy as np
from fixtures_data import shapes_data_dir  # noqa: F401  (fixture)
from fixtures_workdir import tiny_config
from jax.sharding import PartitionSpec as P

from vlm_jax import evaluate
from vlm_jax.config import MeshConfig, to_dict
from vlm_jax.generate import Generator
from vlm_jax.inputs.tokenizer import train_sentencepiece
from vlm_jax.model.vlm import init_params
from vlm_jax.sharding import make_mesh, replicated

SENTENCES = ["What colour is the circle?", "The red square is on the left.", "Is there a blue star? yes"] * 5


def test_batches_run_over_the_mesh_batch_axes_with_the_same_tokens():
  tok = train_sentencepiece(SENTENCES, 400)
  config = tiny_config(tok.vocab_size)
  params = init_params(config.model, jax.random.key(0))
  mesh = make_mesh(MeshConfig(data=4, tensor=2))
  plain, placed = Generator(config, params, tok), Generator(config, jax.device_put(params, replicated(mesh)), tok)
  assert plain.mesh is None and placed.mesh is mesh
  rng = np.random.RandomState(0)
  requests = [([rng.randint(0, 256, (16, 20 + i, 3)).astype(np.uint8)], f"<image>\n{SENTENCES[i % 3]}")
              for i in range(4)]
  batch = placed.place(placed.prepare(requests))
  assert batch["input_ids"].sharding.spec == P(("data", "fsdp", "expert"), None)
  assert batch["pixel_values"].sharding.spec == P(("data", "fsdp", "expert"), None, None, None, None)
  assert placed.place(placed.prepare(requests[:2]))["input_ids"].sharding.spec == P()  # 2 rows: every device
  assert placed.place(placed.prepare(requests[:1]))["input_ids"].sharding.spec == P()  # 1 row: every device
  expected = [r.token_ids for r in plain.generate(requests, max_new_tokens=4)]
  assert [r.token_ids for r in placed.generate(requests, max_new_tokens=4)] == expected
  assert any(expected)


class Yes:
  def generate(self, requests, max_new_tokens):
    del max_new_tokens
    return [type("Result", (), {"text": "yes"}) for _ in requests]


def test_only_process_zero_writes_the_eval_files(shapes_data_dir, tmp_path, monkeypatch):  # noqa: F811
  (tmp_path / "config.json").write_text(json.dumps(to_dict(tiny_config(512, shapes_data_dir))))
  monkeypatch.setattr(evaluate.jax, "process_index", lambda: 1)
  other = evaluate.evaluate(tmp_path, limit=3, generator=Yes(), progress=False)
  assert not (tmp_path / "eval").exists()
  monkeypatch.setattr(evaluate.jax, "process_index", lambda: 0)
  first = evaluate.evaluate(tmp_path, limit=3, generator=Yes(), progress=False)
  assert other == first == json.loads((tmp_path / "eval" / "results.json").read_text())
  assert first["n"] == 9 and 0 < first["accuracy"]["overall"] < 1
  lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
  assert [p["answer"] for p in lines[:9]] == ["yes"] * 9
  assert (tmp_path / "eval" / "samples.png").exists()
