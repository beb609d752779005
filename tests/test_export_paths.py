"""Export to a remote (gs://) directory: the files are written locally, then copied up through etils.epath; here
the copy goes to a local directory, through the same code path, and must hold what a direct export holds."""
import jax
import numpy as np
from safetensors import safe_open

from fixtures_workdir import tiny_config
from vlm_jax.convert import export
from vlm_jax.model.vlm import init_params


def test_a_remote_export_is_staged_then_copied_file_for_file(tmp_path, monkeypatch):
  config = tiny_config(64)
  params = jax.tree.map(np.asarray, init_params(config.model, jax.random.key(0)))
  direct = export.export(params, config.model, None, tmp_path / "direct", fmt="torch")
  assert not export.is_remote(direct) and export.is_remote("gs://bucket/out")
  remote = tmp_path / "remote" / "nested"
  monkeypatch.setattr(export, "is_remote", lambda path: str(path) == str(remote))
  out = export.export(params, config.model, None, remote, fmt="torch")
  assert str(out) == str(remote)
  names = sorted(p.name for p in direct.iterdir())
  assert names == ["model.safetensors", "name_map.json"] == sorted(p.name for p in remote.iterdir())
  assert (remote / "name_map.json").read_text() == (direct / "name_map.json").read_text()
  # safetensors' header order is not fixed from one write to the next: compare what the files hold.
  got, expected = (safe_open(str(d / "model.safetensors"), framework="numpy") for d in (remote, direct))
  assert got.metadata() == expected.metadata() and sorted(got.keys()) == sorted(expected.keys())
  assert len(expected.keys()) > 10
  for key in expected.keys():
    np.testing.assert_array_equal(got.get_tensor(key), expected.get_tensor(key))
