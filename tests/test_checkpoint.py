"""Checkpoints: save cadence, restore onto another mesh, shape-mismatch errors, data iterator, stage handoff."""
import json
import logging

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import checkpoint
from vlm_jax.config import MeshConfig, StageConfig
from vlm_jax.sharding import make_mesh
from vlm_jax.train import optimizer

STAGE = StageConfig(name="align", steps=5, checkpoint_every=2, max_to_keep=2, trainable=("projector/.*",))


def toy_params(width=12):
  rng = np.random.default_rng(1)
  return {"vision": {"pos_embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
          "projector": {"linear_1": {"kernel": jnp.asarray(rng.normal(size=(8, width)), jnp.float32),
                                     "bias": jnp.asarray(rng.normal(size=(width,)), jnp.float32)}}}


def toy_state(params, step=3):
  tx = optimizer.make_optimizer(STAGE, params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, tx.init(params), params)  # non-zero Adam moments
  return {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state}


def abstract(state, sharding_of):
  """ShapeDtypeStructs of `state` carrying the shardings `sharding_of(leaf)`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state)


def loader(seed=0):
  sampler = grain.IndexSampler(50, grain.ShardOptions(0, 1), shuffle=True, seed=seed, num_epochs=1)
  return grain.DataLoader(data_source=grain.RangeDataSource(0, 50, 1), sampler=sampler,
                          operations=[grain.Batch(4)], worker_count=0)


def test_restore_onto_a_different_mesh_and_data_iterator(tmp_path):
  big = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # 8 devices
  state = toy_state(toy_params())
  state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(big, P(*(("fsdp", "tensor")[:x.ndim])))
                                                if x.ndim and x.shape[0] % 2 == 0 else NamedSharding(big, P())),
                       state)
  assert state["params"]["vision"]["pos_embed"].sharding.spec == P("fsdp", "tensor")
  it = iter(loader())
  seen = [next(it) for _ in range(3)]
  mngr = checkpoint.manager(tmp_path, STAGE)
  assert checkpoint.save(mngr, 3, state, it, force=True)
  mngr.wait_until_finished()
  expected_next = [next(it) for _ in range(2)]

  small = make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
  target = abstract(state, lambda x: NamedSharding(small, P("data") if x.ndim and x.shape[0] % 2 == 0 else P()))
  fresh = iter(loader())
  restored = checkpoint.restore(checkpoint.manager(tmp_path, STAGE), 3, target, fresh)
  assert jax.tree.structure(restored) == jax.tree.structure(state)  # optax namedtuples come back as such
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored["params"]["vision"]["pos_embed"].sharding == NamedSharding(small, P("data"))
  assert set(restored["params"]["vision"]["pos_embed"].sharding.device_set) == set(jax.devices()[:2])
  # The data iterator continues exactly where the saved one was.
  got = [next(fresh) for _ in range(2)]
  for a, b in zip(expected_next, got):
    np.testing.assert_array_equal(a, b)
  assert not any(np.array_equal(seen[0], g) for g in got)


def test_a_state_with_the_old_rng_still_restores(tmp_path):
  """Train states used to hold an unused `rng`: their checkpoints resume into today's state, which has none."""
  state = toy_state(toy_params())
  mngr = checkpoint.manager(tmp_path, STAGE)
  checkpoint.save(mngr, 3, {**state, "rng": jax.random.PRNGKey(7)}, force=True)
  mngr.wait_until_finished()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored = checkpoint.restore(checkpoint.manager(tmp_path, STAGE), 3, abstract(state, lambda x: device))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shape_mismatch_names_path_and_both_shapes(tmp_path):
  mngr = checkpoint.manager(tmp_path, STAGE)
  checkpoint.save(mngr, 3, toy_state(toy_params(width=12)), force=True)
  mngr.wait_until_finished()
  other = toy_state(toy_params(width=16))
  target = abstract(other, lambda x: NamedSharding(make_mesh(MeshConfig(data=-1)), P()))
  with pytest.raises(ValueError, match=r"params/projector/linear_1/bias: checkpoint has \(12,\), the target model "
                                       r"wants \(16,\)"):
    checkpoint.restore(checkpoint.manager(tmp_path, STAGE), 3, target)
  checkpoint.mark_finished(tmp_path, "align", 3)
  with pytest.raises(ValueError, match=r"params/projector/linear_1/bias: checkpoint has \(12,\)"):
    checkpoint.final_params(tmp_path, "align", target["params"])


def test_save_cadence_keeps_the_last_and_forces_the_final_step(tmp_path):
  state = toy_state(toy_params())
  mngr = checkpoint.manager(tmp_path, STAGE)
  started = [checkpoint.save(mngr, step, state, force=step == STAGE.steps) for step in range(1, 6)]
  mngr.wait_until_finished()
  assert started == [False, True, False, True, True]
  assert mngr.all_steps() == [4, 5]  # max_to_keep=2 dropped step 2
  assert (tmp_path / "align" / "5" / "state").is_dir()


def test_final_params_handoff_and_init_from_resolution(tmp_path):
  params = toy_params()
  mngr = checkpoint.manager(tmp_path, STAGE)
  checkpoint.save(mngr, 5, toy_state(params, step=5), force=True)
  mngr.wait_until_finished()
  target = abstract(params, lambda x: NamedSharding(make_mesh(MeshConfig(data=-1)), P()))
  assert checkpoint.finished_step(tmp_path, "align") is None
  with pytest.raises(FileNotFoundError, match="'align' .* is not finished"):
    checkpoint.final_params(tmp_path, "align", target)
  checkpoint.mark_finished(tmp_path, "align", 5)
  assert checkpoint.finished_step(tmp_path, "align") == 5
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger("absl").addHandler(handler)
  try:
    got = checkpoint.final_params(tmp_path, "align", target)
  finally:
    logging.getLogger("absl").removeHandler(handler)
  # orbax warns twice per read-only manager that it is read-only; the handoff reads, so that is noise.
  assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
  assert jax.tree.structure(got) == jax.tree.structure(params)  # params only, no opt_state
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # init_from: a stage dir, or a workdir meaning its last finished stage.
  (tmp_path / "config.json").write_text(json.dumps({"train": {"stages": [{"name": "align"}, {"name": "instruct"}]}}))
  assert checkpoint.resolve_init_from(str(tmp_path)) == (str(tmp_path), "align")
  assert checkpoint.resolve_init_from(str(tmp_path / "align")) == (str(tmp_path), "align")
  with pytest.raises(FileNotFoundError, match="neither a finished stage dir"):
    checkpoint.resolve_init_from(str(tmp_path / "instruct"))


def test_saving_replicated_arrays_on_cpu_runs_no_jax_program(tmp_path, caplog):
  """On CPU each replicated array is written whole by its first replica: no per-replica slices, whose
  programs (one compile per slice shape) were most of a tiny run's first save. The bytes restore exactly, and
  switching Orbax's handler logs nothing."""
  from jax._src import monitoring  # pylint: disable=import-outside-toplevel
  mesh = make_mesh(MeshConfig(data=8))
  params = jax.device_put(toy_params(width=24), NamedSharding(mesh, P()))  # replicated over the 8 devices
  traced = []
  def listener(event, duration, **_):  # pylint: disable=unused-argument
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traced.append(event)
  checkpoint._plain_array_saves_on_cpu.cache_clear()  # pylint: disable=protected-access  (as in a fresh process)
  with caplog.at_level(logging.INFO, logger="absl"):
    mngr = checkpoint.manager(tmp_path, STAGE)
  assert not [r for r in caplog.records if "overriding" in r.getMessage()]
  monitoring.register_event_duration_secs_listener(listener)
  try:
    assert checkpoint.save(mngr, 2, {"params": params}, force=True)
    mngr.wait_until_finished()
  finally:
    monitoring.unregister_event_duration_listener(listener)
  assert traced == []
  restored = checkpoint.restore(mngr, 2, abstract({"params": params}, lambda x: x.sharding))
  for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
