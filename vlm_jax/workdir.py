"""Reading a training workdir back: its config, its tokenizer and the final params of one stage.

Layout (DESIGN.md "Workdir layout"): W/config.json (the resolved config), W/tokenizer/, W/<stage>/ (one Orbax
manager per stage, finished when W/<stage>/FINISHED names the final step). Params are restored by
`checkpoint.final_params` onto the shardings of a mesh (the config's mesh unless one is given).
"""
from __future__ import annotations

from typing import Any

import jax
from etils import epath
from jax.sharding import Mesh

from vlm_jax import checkpoint, sharding
from vlm_jax.config import Config, from_dict, validate
from vlm_jax.inputs import files
from vlm_jax.inputs.tokenizer import Tokenizer
from vlm_jax.model import lora
from vlm_jax.model.vlm import abstract_params

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def read_config(workdir: str | epath.PathLike) -> Config:
  """The resolved Config a run saved in W/config.json."""
  path = epath.Path(workdir).expanduser() / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir} is not a workdir: it has no {CONFIG_FILE}. Train into it first, e.g. "
                            f"`vlm-jax train --config shapes_tiny --workdir {workdir}`.")
  return validate(from_dict(Config, files.read_json(path, "workdir config", "write it again from the config, e.g. "
                                                   "`vlm-jax config show NAME --set ... > config.json`")))


def last_finished_stage(workdir: str | epath.PathLike, config: Config) -> str:
  """The name of the last stage, in config order, whose final checkpoint is on disk."""
  names = [s.name for s in config.train.stages]
  done = [n for n in names if checkpoint.finished_step(workdir, n) is not None]
  if not done:
    raise FileNotFoundError(f"{workdir} has no finished stage among {names}: train at least one stage to the "
                            f"end (`vlm-jax train --workdir {workdir} ...`).")
  return done[-1]


def load(workdir: str | epath.PathLike, stage: str | None = None,
         mesh: Mesh | None = None, merge: bool = True) -> tuple[Config, Any, Tokenizer]:
  """(config, params, tokenizer) of a workdir; params of `stage` (default: the last finished stage), placed
  on `mesh` (default: the config's mesh over all devices) by the logical axis rules. A LoRA stage's adapters
  are merged into the params, or with merge=False kept under params['lora'] (vlm_jax/model/lora.py)."""
  config = read_config(workdir)
  tokenizer_dir = epath.Path(workdir).expanduser() / TOKENIZER_DIR
  if not tokenizer_dir.exists():
    raise FileNotFoundError(f"{workdir} has no {TOKENIZER_DIR}/ directory; the training run writes it.")
  tokenizer = Tokenizer.load(tokenizer_dir)
  if stage is None:
    stage = last_finished_stage(workdir, config)
  else:
    config.train.stage(stage)  # an unknown name raises ConfigError naming the close matches
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  shapes, logical = abstract_params(config.model)
  lora_config = config.train.stage(stage).lora
  shapes, logical = lora.with_abstract(shapes, logical, lora_config)
  shardings = sharding.logical_shardings(logical, mesh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  params = checkpoint.final_params(workdir, stage, target)
  return config, lora.merged(params, lora_config) if merge else params, tokenizer
