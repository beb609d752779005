"""Configs: overrides, their errors, validation, JSON round trip, the shipped config files."""
import dataclasses

import pytest

from vlm_jax import config


def _cfg():
  return config.load("shapes_tiny")


def test_override_nested_and_stage_by_name():
  cfg = config.load("shapes_tiny", ["train.stages.align.steps=7", "model.decoder.num_layers=2",
                                    "train.stages.instruct.trainable=('projector/.*',)", "model.dtype=bfloat16",
                                    "data.packing=true", "train.stages.align.lr=3e-4"])
  assert cfg.train.stage("align").steps == 7
  assert cfg.model.decoder.num_layers == 2
  assert cfg.train.stage("instruct").trainable == ("projector/.*",)
  assert cfg.model.dtype == "bfloat16" and cfg.data.packing is True
  assert cfg.train.stage("align").lr == 3e-4 and isinstance(cfg.train.stage("align").lr, float)
  # the other stages are untouched, and the original config object is not mutated
  assert cfg.train.stage("text_pretrain").steps == _cfg().train.stage("text_pretrain").steps
  assert _cfg().train.stage("align").steps != 7


def test_unknown_key_names_close_matches():
  with pytest.raises(config.ConfigError) as e:
    config.load("shapes_tiny", ["model.decoder.num_layer=2"])
  assert "Unknown config key 'model.decoder.num_layer'" in str(e.value)
  assert "'model.decoder.num_layers'" in str(e.value)


def test_unknown_stage_names_close_matches():
  with pytest.raises(config.ConfigError) as e:
    config.load("shapes_tiny", ["train.stages.algn.steps=1"])
  assert "'algn'" in str(e.value) and "Did you mean 'align'" in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("model.decoder.num_layers=abc", "model.decoder.num_layers='abc': expected int."),
    ("model.decoder.num_layers=2.5", "model.decoder.num_layers='2.5': expected int."),
    ("data.packing=maybe", "data.packing='maybe': expected bool. Use true or false."),
    ("train.stages.align.trainable=3", "train.stages.align.trainable='3': expected tuple[str, ...]."),
    ("model.dtype=float16", "model.dtype='float16' is not one of ('auto', 'float32', 'bfloat16')."),
    ("model.decoder=3", "model.decoder: is a group; set one of its keys, e.g. model.decoder.vocab_size=..."),
    ("steps", "Override 'steps' must look like key=value, e.g. train.stages.align.steps=100."),
    ("model.decoder.num_layers=0", "model.decoder.num_layers=0 must be a positive size."),
    ("model.vision.depth=-3", "model.vision.depth=-3 must be a positive size."),
    ("data.seq_len=300", "data.seq_len=300 is longer than model.decoder.max_seq_len=256 (the RoPE / cache length "
                         "the model is built for): raise max_seq_len or shorten seq_len."),
    ("train.stages.align.lr=-1", "train.stages.align: lr, warmup_steps, weight_decay and grad_clip must be >= 0 "
                                 "(got lr=-1.0, warmup_steps=20, weight_decay=0.0, grad_clip=1.0)."),
])
def test_bad_values_say_what_and_where(override, expected):
  with pytest.raises(config.ConfigError) as e:
    config.load("shapes_tiny", [override])
  assert str(e.value) == expected


def test_cross_field_validation():
  with pytest.raises(config.ConfigError, match="not a multiple of num_kv_heads"):
    config.load("shapes_tiny", ["model.decoder.num_kv_heads=4"])
  with pytest.raises(config.ConfigError, match="divisible by grad_accum"):
    config.load("shapes_tiny", ["train.stages.align.grad_accum=3"])
  with pytest.raises(config.ConfigError, match=r"sincos2d' needs a width divisible by 4 .* got width=126; .* "
                                               r"a width like 128"):
    config.load("shapes_tiny", ["model.vision.width=126", "model.vision.num_heads=2"])


def test_unknown_config_name():
  with pytest.raises(config.ConfigError, match="Did you mean 'shapes_tiny'"):
    config.load("shapes_tiny2")


def test_configs_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    _cfg().model.decoder.width = 3


@pytest.mark.parametrize("name", ["shapes_tiny", "smolvlm_256m", "llava15_7b", "llama3_8b", "bench_cpu"])
def test_dict_round_trip(name):
  cfg = config.load(name)
  assert config.from_dict(config.Config, config.to_dict(cfg)) == cfg


def test_image_tokens_per_tile():
  assert config.load("shapes_tiny").model.image_tokens_per_tile == 9    # (48/8)^2 / 2^2
  assert config.load("smolvlm_256m").model.image_tokens_per_tile == 64  # (512/16)^2 / 4^2
  assert config.load("llava15_7b").model.image_tokens_per_tile == 576   # (336/14)^2, CLS dropped
  assert config.load("bench_cpu").model.image_tokens_per_tile == 16     # (128/16)^2 / 2^2


def test_repeated_set_options_all_apply(capsys):
  """`--set a=1 --set b=2` keeps both (argparse's nargs='*' alone keeps only the last)."""
  import json  # pylint: disable=import-outside-toplevel
  from vlm_jax import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(["config", "show", "shapes_tiny", "--set", "train.stages.align.steps=7",
                   "--set", "train.stages.instruct.steps=9", "seed=3"]) == 0
  shown = json.loads(capsys.readouterr().out)
  steps = {s["name"]: s["steps"] for s in shown["train"]["stages"]}
  assert (steps["align"], steps["instruct"], steps["text_pretrain"], shown["seed"]) == (7, 9, 200, 3)
  args = cli.build_parser().parse_args(["train", "--config", "shapes_tiny", "--workdir", "w", "--set", "a=1",
                                        "--set", "b=2", "c=3"])
  assert args.set == ["a=1", "b=2", "c=3"]
