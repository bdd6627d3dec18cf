"""The dense reference model of ``dense_finetune``: the MoE model without experts, its MLP as wide
as the MoE model's activated feed-forward width (FLOP-matched per token)."""

import dataclasses

from lifelong_moe_jax.models.config import ModelConfig


def dense_mlp_dim(config: ModelConfig) -> int:
  """MLP width of a dense model with the MoE model's activated feed-forward FLOPs per token.

  Dense layers use ``mlp_dim``; an MoE layer activates ``top_k`` experts of ``expert_hidden_dim``.
  The dense model uses the average over layers, e.g. (512 + 2 * 512) / 2 = 768 for the demo model.
  """
  if not config.is_moe:
    return config.mlp_dim
  moe = config.num_moe_layers
  total = (config.num_layers - moe) * config.mlp_dim + moe * config.top_k * config.expert_hidden_dim
  return int(round(total / config.num_layers))


def dense_config(config: ModelConfig, mlp_dim: int | None = None) -> ModelConfig:
  """The dense counterpart of ``config`` (``num_experts = 0``, FLOP-matched width by default)."""
  return dataclasses.replace(
    config, num_experts=0, expert_mlp_dim=None, mlp_dim=mlp_dim or dense_mlp_dim(config)
  )
