"""Loading a workdir: config, tokenizer, params of the last finished stage (or a named one); clear errors."""
import json

import jax
import numpy as np
import pytest
from fixtures_workdir import make_workdir, tiny_config

from vlm_jax import workdir
from vlm_jax.config import ConfigError, to_dict
from vlm_jax.inputs.tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def tokenizer():
  return train_sentencepiece(["What colour is the circle?", "Is there a red star? yes"] * 5, 400)


def _assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_last_finished_stage_or_a_named_one(tmp_path, tokenizer):
  config = tiny_config(tokenizer.vocab_size)
  saved = make_workdir(tmp_path, config, tokenizer, finished=("align",))
  loaded_config, params, tok = workdir.load(tmp_path)
  assert loaded_config == config
  assert tok.encode("What colour?") == tokenizer.encode("What colour?") and tok.vocab_size == tokenizer.vocab_size
  _assert_equal_trees(params, saved["align"])
  # Params land on the config's mesh (data=-1: all 8 devices), replicated by the rules for this tiny model.
  kernel = params["decoder"]["lm_head"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and kernel.sharding.is_fully_replicated
  with pytest.raises(FileNotFoundError, match="Stage 'instruct' .* is not finished"):
    workdir.load(tmp_path, "instruct")
  with pytest.raises(ConfigError, match="Unknown stage 'instrct'.*Did you mean 'instruct'"):
    workdir.load(tmp_path, "instrct")

  both = make_workdir(tmp_path / "both", config, tokenizer, finished=("align", "instruct"))
  _, params, _ = workdir.load(tmp_path / "both")
  _assert_equal_trees(params, both["instruct"])  # the last finished stage in config order
  assert not np.array_equal(np.asarray(both["align"]["decoder"]["lm_head"]["kernel"]),
                            np.asarray(both["instruct"]["decoder"]["lm_head"]["kernel"]))
  _assert_equal_trees(workdir.load(tmp_path / "both", "align")[1], both["align"])


def test_errors_name_what_is_missing(tmp_path, tokenizer):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"is not a workdir: it has no config.json.*vlm-jax train"):
    workdir.load(tmp_path / "empty")
  config = tiny_config(tokenizer.vocab_size)
  make_workdir(tmp_path / "fresh", config, tokenizer, finished=())
  with pytest.raises(FileNotFoundError, match=r"no finished stage among \['align', 'instruct'\]"):
    workdir.load(tmp_path / "fresh")
  (tmp_path / "bare").mkdir()
  (tmp_path / "bare" / "config.json").write_text(json.dumps(to_dict(config)))
  with pytest.raises(FileNotFoundError, match="no tokenizer/ directory"):
    workdir.load(tmp_path / "bare")
