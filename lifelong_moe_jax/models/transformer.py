"""GLaM-style decoder stack.

Layer ``i`` is pre-norm attention followed by a pre-norm feed-forward block, which is an
``MoeLayer`` when ``config.is_moe_layer(i)`` (every ``moe_every``-th layer) and a dense
``MlpBlock`` otherwise. With ``scan_layers`` the stack is scanned over blocks of ``moe_every``
consecutive layers (one MoE layer per block), so every parameter gains a leading ``layers`` axis.

Param tree (unscanned): ``embed/embedding``, ``layers_{i}/{attention,pre_attention_norm,
pre_mlp_norm,mlp|moe}``, ``final_norm``, ``logits`` (when untied).
Param tree (scanned): ``blocks/layer_{j}/...`` with a leading ``[num_layers // moe_every]`` axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lifelong_moe_jax.layers.attention import Attention
from lifelong_moe_jax.layers.dense import Embed, MlpBlock, RMSNorm, default_kernel_init
from lifelong_moe_jax.layers.moe import MoeLayer
from lifelong_moe_jax.models.config import ModelConfig

Array = jax.Array


class DecoderLayer(nn.Module):
  """One pre-norm decoder layer; ``x [batch, length, embed] -> [batch, length, embed]``."""

  config: ModelConfig
  use_moe: bool

  @nn.compact
  def __call__(
    self,
    x: Array,
    positions: Array,
    segment_ids: Array | None,
    token_mask: Array | None,
    train: bool = False,
    decode: bool = False,
  ) -> Array:
    cfg = self.config
    dtype = cfg.activation_dtype
    h = RMSNorm(dtype=dtype, name="pre_attention_norm")(x)
    h = Attention(
      cfg.num_heads, cfg.head_dim, cfg.max_length, cfg.rope_max_wavelength, dtype, name="attention"
    )(h, positions, segment_ids, decode=decode, token_mask=token_mask)
    x = x + h
    h = RMSNorm(dtype=dtype, name="pre_mlp_norm")(x)
    if self.use_moe:
      h = MoeLayer(
        num_experts=cfg.num_experts,
        mlp_dim=cfg.expert_hidden_dim,
        top_k=cfg.top_k,
        group_size=cfg.group_size,
        train_capacity_factor=cfg.train_capacity_factor,
        eval_capacity_factor=cfg.eval_capacity_factor,
        router_jitter=cfg.router_jitter,
        normalize_gates=cfg.normalize_top_k_gates,
        activation=cfg.activation,
        gated=cfg.gated_mlp,
        dtype=dtype,
        dispatch=cfg.moe_dispatch,
        batch_prioritized=cfg.batch_prioritized_routing,
        name="moe",
      )(h, token_mask, train=train)
    else:
      h = MlpBlock(cfg.mlp_dim, cfg.activation, cfg.gated_mlp, dtype, name="mlp")(h)
    x = x + h
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderBlock(nn.Module):
  """``moe_every`` consecutive layers (the unit that is scanned); returns ``(x, None)``."""

  config: ModelConfig
  train: bool
  decode: bool

  @nn.compact
  def __call__(
    self, x: Array, positions: Array, segment_ids: Array | None, token_mask: Array | None
  ):
    cfg = self.config
    for j in range(cfg.moe_every):
      x = DecoderLayer(cfg, use_moe=cfg.is_moe_layer(j), name=f"layer_{j}")(
        x, positions, segment_ids, token_mask, train=self.train, decode=self.decode
      )
    return x, None


class Decoder(nn.Module):
  """Decoder-only transformer: token ids ``[batch, length]`` -> logits ``[batch, length, vocab]``."""

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    input_tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    token_mask: Array | None = None,
    *,
    train: bool = False,
    decode: bool = False,
  ) -> Array:
    """Runs the stack.

    Args:
      input_tokens: int [batch, length] (targets shifted right).
      positions: int [batch, length]; defaults to 0..length-1.
      segment_ids: int [batch, length] packing segments (0 = padding) or None.
      token_mask: bool [batch, length]; False marks padding tokens (not routed to experts).
      train: training mode (train capacity factor, router jitter).
      decode: incremental decoding with the KV cache.
    Returns:
      float32 logits [batch, length, vocab].
    """
    cfg = self.config
    batch, length = input_tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    embed = Embed(cfg.vocab_size, cfg.embed_dim, cfg.activation_dtype, name="embed")
    x = embed(input_tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    if cfg.scan_layers:
      block = DecoderBlock
      if cfg.remat:
        block = nn.remat(block, prevent_cse=False)
      scanned = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0, "cache": 0},
        split_rngs={"params": True, "jitter": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers // cfg.moe_every,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = scanned(cfg, train, decode, name="blocks")(x, positions, segment_ids, token_mask)
    else:
      layer = nn.remat(DecoderLayer, static_argnums=(5, 6)) if cfg.remat else DecoderLayer
      for i in range(cfg.num_layers):
        if cfg.remat:
          x = layer(cfg, cfg.is_moe_layer(i), name=f"layers_{i}")(
            x, positions, segment_ids, token_mask, train, decode
          )
        else:
          x = layer(cfg, cfg.is_moe_layer(i), name=f"layers_{i}")(
            x, positions, segment_ids, token_mask, train=train, decode=decode
          )

    x = RMSNorm(dtype=cfg.activation_dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x) / jnp.sqrt(cfg.embed_dim)
    else:
      kernel = self.param(
        "logits",
        nn.with_logical_partitioning(default_kernel_init, ("embed", "vocab")),
        (cfg.embed_dim, cfg.vocab_size),
        jnp.float32,
      )
      logits = jnp.einsum("bld,dv->blv", x.astype(jnp.float32), kernel)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
