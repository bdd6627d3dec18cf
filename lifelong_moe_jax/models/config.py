"""Model hyperparameters (gin-configurable).

One frozen dataclass describes every decoder this package builds: dense (``num_experts == 0``) or
GLaM-style MoE (an MoE feed-forward block every ``moe_every``-th layer, dense elsewhere).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a decoder-only (MoE) language model.

  Attributes:
    vocab_size: number of logits; normally taken from the vocabulary (see ``lm.build_model``).
    embed_dim: model width d_model.
    num_layers: decoder layers; with MoE, must be a multiple of ``moe_every``.
    num_heads: attention heads.
    head_dim: width of one head.
    mlp_dim: hidden width of the dense feed-forward blocks.
    num_experts: experts per MoE layer; 0 builds a dense model.
    expert_mlp_dim: hidden width of each expert (defaults to ``mlp_dim``).
    moe_every: every ``moe_every``-th layer (layers moe_every-1, 2*moe_every-1, ...) is an MoE layer.
    top_k: experts each token is routed to.
    group_size: tokens routed together (capacity is computed per group).
    train_capacity_factor / eval_capacity_factor: expert capacity multipliers for train and eval.
    router_jitter: multiplicative uniform noise on router inputs during training (0 disables).
    normalize_top_k_gates: renormalise the k selected gates to sum to one (GShard/GLaM).
    aux_loss_weight: weight of the load-balancing loss in the total loss.
    router_z_loss_weight: weight of the router z-loss in the total loss.
    moe_dispatch: how tokens reach the experts: "einsum" (one-hot dispatch/combine einsums, the
      reference), "sort" (same routing and drops via sort + gather, no [G, S, E, C] tensor) or
      "ragged" (dropless grouped matmuls); params are identical for all three.
    batch_prioritized_routing: fill expert capacity in order of decreasing top-1 router
      probability (V-MoE) instead of token position ("einsum" and "sort" only).
    gated_mlp: use a gated (GLU-style) feed-forward with ``wi_gate``.
    activation: "gelu", "relu" or "silu".
    tie_embeddings: compute logits with the transposed input embedding.
    scan_layers: scan over blocks of ``moe_every`` layers (params gain a leading ``layers`` axis).
    max_length: longest sequence the model is used with (decode cache size).
    rope_max_wavelength: rotary embedding base.
    dtype: activation dtype ("float32" or "bfloat16"); params are always float32, router math float32.
    remat: rematerialise each layer in the backward pass.
  """

  vocab_size: int = 256
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 128
  num_experts: int = 4
  expert_mlp_dim: int | None = None
  moe_every: int = 2
  top_k: int = 2
  group_size: int = 256
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  router_jitter: float = 0.0
  normalize_top_k_gates: bool = True
  aux_loss_weight: float = 0.01
  router_z_loss_weight: float = 0.001
  moe_dispatch: str = "einsum"
  batch_prioritized_routing: bool = False
  gated_mlp: bool = False
  activation: str = "gelu"
  tie_embeddings: bool = False
  scan_layers: bool = False
  max_length: int = 2048
  rope_max_wavelength: float = 10_000.0
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    self.validate()

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def expert_hidden_dim(self) -> int:
    return self.expert_mlp_dim or self.mlp_dim

  @property
  def activation_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  def is_moe_layer(self, layer_index: int) -> bool:
    """Whether decoder layer ``layer_index`` (0-based) holds an MoE block."""
    return self.is_moe and (layer_index % self.moe_every) == self.moe_every - 1

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))

  def validate(self) -> None:
    """Raises ValueError naming the bad field and the fix."""
    positive = (
      "vocab_size",
      "embed_dim",
      "num_layers",
      "num_heads",
      "head_dim",
      "mlp_dim",
      "moe_every",
      "top_k",
      "group_size",
      "max_length",
    )
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")
    if self.num_experts < 0:
      raise ValueError(f"ModelConfig.num_experts must be >= 0 (0 = dense), got {self.num_experts}.")
    if self.is_moe and self.top_k > self.num_experts:
      raise ValueError(
        f"ModelConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: every token must "
        f"pick distinct experts. Set ModelConfig.top_k <= {self.num_experts} or add experts."
      )
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")
    if self.moe_dispatch not in ("einsum", "sort", "ragged"):
      raise ValueError(
        f"ModelConfig.moe_dispatch must be 'einsum', 'sort' or 'ragged', got {self.moe_dispatch!r}."
      )
    if self.activation not in ("gelu", "relu", "silu"):
      raise ValueError(
        f"ModelConfig.activation must be gelu, relu or silu, got {self.activation!r}."
      )
    if self.scan_layers and self.num_layers % self.moe_every:
      raise ValueError(
        f"scan_layers needs num_layers ({self.num_layers}) to be a multiple of moe_every "
        f"({self.moe_every}): layers are scanned in blocks of moe_every."
      )
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")
    if self.head_dim % 2:
      raise ValueError(
        f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}."
      )
