"""One process of tests/test_multihost.py's feeding check: joins the others, builds each mesh's global batches
the way `vlm-jax train` does (ShardedLoader with the default shard count, loader.to_global), and saves them
whole (gathered from every process) to OUT/<mesh>_process_<i>.npz.

usage: python multihost_feed.py CONFIG DATA_DIR OUT COORDINATOR NUM_PROCESSES PROCESS_ID
"""
import sys

import numpy as np

from vlm_jax import distributed

MESHES = {"tensor8": ["mesh.data=1", "mesh.tensor=8"], "data8": ["mesh.data=8"]}
BATCHES = 2


def global_batches(config, mesh, count=BATCHES):
  """`count` global batches of the align stage as numpy dicts [batch_size, ...], gathered from every process."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from vlm_jax.inputs import loader, shards  # pylint: disable=import-outside-toplevel
  from vlm_jax.inputs.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  data = shards.ShardedLoader(config, config.train.stage("align"), load_tokenizer(config), mesh=mesh)
  out = []
  for _ in range(count):
    arrays = loader.to_global(next(data), mesh)
    out.append({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in arrays.items()})
  return out


def main(config_path, data_dir, out, coordinator, num_processes, process_id):
  distributed.initialize(coordinator, int(num_processes), int(process_id), cpu_devices=4)
  from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from vlm_jax.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  for name, overrides in MESHES.items():
    config = config_lib.load(config_path, [f"data.data_dir={data_dir}", *overrides])
    batches = global_batches(config, make_mesh(config.mesh))
    np.savez(f"{out}/{name}_process_{process_id}.npz",
             **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
  distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
