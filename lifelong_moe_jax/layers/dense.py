"""Dense building blocks: RMSNorm, token embedding, feed-forward MLP, activation lookup.

Every parameter carries logical axis names (flax ``LogicallyPartitioned`` metadata); the mesh
rules in ``partitioning.py`` map them to mesh axes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Kernels: variance scaling over the fan-in ("embed" for wi, "mlp" for wo).
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
embedding_init = nn.initializers.normal(stddev=1.0)


def activation_fn(name: str) -> Callable[[Array], Array]:
  return {"gelu": nn.gelu, "relu": nn.relu, "silu": nn.silu}[name]


class RMSNorm(nn.Module):
  """Root-mean-square layer norm with a learned scale ``[embed]``; computed in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., embed] -> [..., embed] in ``dtype``."""
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      (x.shape[-1],),
      jnp.float32,
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (normed * scale).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding table ``[vocab, embed]``; ``attend`` gives tied logits."""

  vocab_size: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(embedding_init, ("vocab", "embed")),
      (self.vocab_size, self.features),
      jnp.float32,
    )

  def __call__(self, ids: Array) -> Array:
    """ids: int [batch, length] -> [batch, length, embed]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """x: [batch, length, embed] -> logits [batch, length, vocab] (float32)."""
    return jnp.einsum("bld,vd->blv", x.astype(jnp.float32), self.embedding)


class MlpBlock(nn.Module):
  """Position-wise feed-forward: ``wi [embed, mlp]`` -> activation -> ``wo [mlp, embed]``.

  With ``gated`` the hidden state is ``act(x @ wi_gate) * (x @ wi)`` (GLU family).
  """

  mlp_dim: int
  activation: str = "gelu"
  gated: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    embed = x.shape[-1]
    init_in = nn.with_logical_partitioning(default_kernel_init, ("embed", "mlp"))
    wi = self.param("wi", init_in, (embed, self.mlp_dim), jnp.float32)
    h = jnp.einsum("bld,dh->blh", x, wi.astype(self.dtype))
    act = activation_fn(self.activation)
    if self.gated:
      wg = self.param("wi_gate", init_in, (embed, self.mlp_dim), jnp.float32)
      h = act(jnp.einsum("bld,dh->blh", x, wg.astype(self.dtype))) * h
    else:
      h = act(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    wo = self.param(
      "wo",
      nn.with_logical_partitioning(default_kernel_init, ("mlp", "embed")),
      (self.mlp_dim, embed),
      jnp.float32,
    )
    return jnp.einsum("blh,hd->bld", h, wo.astype(self.dtype))
