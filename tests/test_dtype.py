"""model.dtype='auto' (vlm_jax/cpu_features.py): bf16 with native bf16 dot products, float32 without them or under
an XLA ISA cap, bf16 on TPU / GPU; `config show` says what it resolved to; an 'auto' model computes in it."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from fixtures_model import IMG, make_batch, make_row, random_pixels

from vlm_jax import cli, config, cpu_features
from vlm_jax.config import DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlm_jax.model.vlm import VLM, init_params

AMX = ("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 amx_bf16 "
       "amx_tile amx_int8\n")
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512_vnni avx512_bf16\n"
AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4_2 avx avx2 fma bmi2\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha2 asimddp sve bf16 i8mm\n"
ARM_NEON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


@pytest.fixture
def host(monkeypatch, tmp_path):
  """fake(cpuinfo text, XLA_FLAGS) makes host_native_bf16 read them (its cache cleared before and after)."""
  def fake(cpuinfo, xla_flags=""):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    monkeypatch.setattr(cpu_features, "CPUINFO", str(path))
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    cpu_features.host_native_bf16.cache_clear()
  yield fake
  cpu_features.host_native_bf16.cache_clear()


@pytest.mark.parametrize("cpuinfo, xla_flags, expected", [
    (AMX, "", "bfloat16"), (ZEN4, "", "bfloat16"), (ARM_BF16, "", "bfloat16"),
    (AVX2, "", "float32"), (ARM_NEON, "", "float32"), ("", "", "float32"),
    (AMX, "--xla_cpu_max_isa=AVX2", "float32"), (ZEN4, "--xla_force_host_platform_device_count=2 "
                                                      "--xla_cpu_max_isa=avx512", "float32"),
    (AMX, "--xla_cpu_max_isa=AMX", "bfloat16"), (ZEN4, "--xla_cpu_max_isa=AVX512_BF16", "bfloat16")])
def test_auto_on_cpu_follows_native_bf16(host, cpuinfo, xla_flags, expected):
  host(cpuinfo, xla_flags)
  assert cpu_features.resolve("auto", "cpu")[0] == expected


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_auto_is_bf16_on_accelerators_and_explicit_dtypes_stay(host, backend):
  host(AVX2)
  assert cpu_features.resolve("auto", backend) == ("bfloat16", f"the {backend} backend")
  for setting in ("float32", "bfloat16"):
    assert cpu_features.resolve(setting, backend)[0] == setting == cpu_features.resolve(setting, "cpu")[0]
  with pytest.raises(ValueError, match="float16"):
    cpu_features.resolve("float16", "cpu")


def test_cpu_is_read_once(host, monkeypatch):
  host(AMX)
  assert cpu_features.host_native_bf16() == (True, "the CPU has avx512_bf16 and amx_bf16")
  monkeypatch.setattr(cpu_features, "CPUINFO", "/nonexistent")  # cached: not read again
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
  assert cpu_features.resolve("auto", "cpu")[0] == "bfloat16"


def test_config_accepts_auto_and_keeps_it():
  cfg = config.load("shapes_tiny")  # the demo
  assert cfg.model.dtype == "auto"
  assert config.to_dict(cfg)["model"]["dtype"] == "auto"  # as W/config.json saves it
  with pytest.raises(config.ConfigError, match="model.dtype='fp16'"):
    config.load("shapes_tiny", ["model.dtype=fp16"])


def test_config_show_prints_the_resolution(host, capsys):
  host(AVX2, "")
  assert cli.main(["config", "show", "shapes_tiny", "--set", "model.dtype=auto"]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out)["model"]["dtype"] == "auto"  # stdout stays the config's JSON
  assert "model.dtype=auto -> float32 (the CPU has no native bf16" in err
  host(AMX, "--xla_cpu_max_isa=AVX2")
  assert cli.main(["config", "show", "shapes_tiny", "--set", "model.dtype=auto"]) == 0
  assert "model.dtype=auto -> float32 (XLA_FLAGS caps XLA:CPU's ISA at AVX2)" in capsys.readouterr().err
  host(AMX, "")
  assert cli.main(["config", "show", "shapes_tiny", "--set", "model.dtype=auto"]) == 0
  assert "model.dtype=auto -> bfloat16 (the CPU has avx512_bf16 and amx_bf16)" in capsys.readouterr().err
  assert cli.main(["config", "show", "shapes_tiny", "--set", "model.dtype=float32"]) == 0
  assert capsys.readouterr().err == ""


TINY = ModelConfig(
    vision=VisionConfig(kind="siglip", image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
    projector=ProjectorConfig(kind="mlp", act="gelu"),
    decoder=DecoderConfig(vocab_size=64, width=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64),
    image_token_id=IMG, dtype="auto")
T = TINY.image_tokens_per_tile


def _batch():
  return make_batch([make_row([2, *[IMG] * T, 9, 10, 11], 12)], random_pixels(1, 1), [[True]])


def _run(cfg, params):
  """A fresh jit each call: 'auto' is resolved while tracing, under the fake CPU of the moment."""
  return jax.jit(lambda p, b: VLM(cfg).apply({"params": p}, b, return_hidden_states=True))(params, _batch())


def test_auto_model_computes_in_the_resolved_dtype(host):
  assert jax.default_backend() == "cpu"
  params = init_params(dataclasses.replace(TINY, dtype="float32"), jax.random.key(0))
  host(AVX2)
  auto = _run(TINY, params)
  explicit = _run(dataclasses.replace(TINY, dtype="float32"), params)
  assert auto["hidden_states"].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(auto["logits"]), np.asarray(explicit["logits"]))  # bit for bit
  host(AMX)
  shapes = jax.eval_shape(lambda p, b: VLM(TINY).apply({"params": p}, b, return_hidden_states=True),
                          params, _batch())
  assert shapes["hidden_states"].dtype == jax.numpy.bfloat16 and shapes["logits"].dtype == np.float32
