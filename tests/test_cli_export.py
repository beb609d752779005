"""`vlm-jax export` of a workdir, then transformers' generate answers with the same tokens as vlm_jax's
(LLaVA with an MLP projector; Idefics3 with pixel shuffle and unsplit images, the demo's shape)."""
import dataclasses
import json

import numpy as np
import pytest
from fixtures_data import SHAPES_TINY, shapes_data_dir  # noqa: F401  (pytest fixture)
from fixtures_workdir import make_workdir, tiny_config

from vlm_jax import cli, datasets, workdir
from vlm_jax.config import ProjectorConfig
from vlm_jax.convert import export
from vlm_jax.generate import Generator
from vlm_jax.inputs.tokenizer import Tokenizer

pytestmark = pytest.mark.torch


def _config(kind: str, data_dir: str):
  cfg = tiny_config(512, data_dir, SHAPES_TINY)
  if kind == "idefics3":
    v = dataclasses.replace(cfg.model.vision, image_size=32, post_layernorm=True)  # 4x4 patches -> 2x2 tokens
    model = dataclasses.replace(cfg.model, vision=v, projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2))
    cfg = dataclasses.replace(cfg, model=model)
  return cfg


@pytest.mark.parametrize("kind", ["llava", "idefics3"])
def test_exported_model_generates_the_same_tokens(kind, shapes_data_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  tok = Tokenizer.load(datasets.get_builder(SHAPES_TINY, shapes_data_dir).data_path / "tokenizer")
  w = tmp_path / "w"
  make_workdir(w, _config(kind, shapes_data_dir), tok, finished=("align", "instruct"), seed=3)
  assert cli.main(["export", "--workdir", str(w), "--out", str(tmp_path / "hf")]) == 0
  assert capsys.readouterr().out == f"exported to {tmp_path / 'hf'}\n"
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["architectures"] == [{"llava": "LlavaForConditionalGeneration",
                                         "idefics3": "Idefics3ForConditionalGeneration"}[kind]]
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)]
  ours = Generator(*workdir.load(w)).generate([(images, "What colour is the circle?")], max_new_tokens=12)[0]
  _, ids = export.hf_generate(tmp_path / "hf", images, "What colour is the circle?", max_new_tokens=12)
  assert ids == ours.token_ids and len(ids) == 12
  # Text is not compared: a random model emits lone byte-fallback pieces, which HF's decoder and
  # sentencepiece render differently; the ids are the contract.
