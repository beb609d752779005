"""shapes_tiny with a mixture-of-experts decoder ("seemore"): same recipe, data and stages.

Every decoder layer routes each token to 2 of 4 SwiGLU experts of hidden size 256, so the MLP weights a token
goes through (2 x 3 x 192 x 256) equal shapes_tiny's dense MLP (3 x 192 x 512); the router adds 192 x 4 per
layer. Total decoder MLP params double. Dropless routing (capacity_factor 0) keeps training and KV-cache
generation identical in routing; the train step adds the output's `aux_loss` (router losses) to the loss.
"""
import dataclasses

from vlm_jax import config as config_lib
from vlm_jax.config import Config, MoeConfig


def get_config() -> Config:
  base = config_lib.load("shapes_tiny")
  moe = MoeConfig(num_experts=4, experts_per_token=2, every_n_layers=1, expert_mlp_dim=256, capacity_factor=0.0,
                  router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
  decoder = dataclasses.replace(base.model.decoder, moe=moe)
  return dataclasses.replace(base, name="shapes_moe", model=dataclasses.replace(base.model, decoder=decoder))
