"""Causal multi-head self-attention with rotary positions, packing masks and a KV cache.

Shapes: ``x [batch, length, embed]``, queries/keys/values ``[batch, length, heads, head_dim]``.
Packed sequences carry ``segment_ids [batch, length]`` (0 = padding): a token attends only to
earlier tokens of its own segment. For decoding, ``decode=True`` keeps ``cached_key``,
``cached_value`` ``[batch, max_length, heads, head_dim]``, ``cached_valid [batch, max_length]`` and
``cache_index []`` in the flax ``cache`` collection; each call appends its tokens at
``cache_index`` and attends to everything cached so far.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lifelong_moe_jax.layers.dense import default_kernel_init

Array = jax.Array
_NEG_INF = -1e10


def rotary_embedding(x: Array, positions: Array, max_wavelength: float) -> Array:
  """Applies rotary position embedding.

  Args:
    x: [batch, length, heads, head_dim] (head_dim even).
    positions: int [batch, length] absolute positions of the tokens.
    max_wavelength: rotary base.
  Returns:
    [batch, length, heads, head_dim], same dtype as x.
  """
  half = x.shape[-1] // 2
  freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions.astype(jnp.float32)[:, :, None, None] * freq  # [b, l, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_segment_mask(segment_ids: Array) -> Array:
  """bool [batch, 1, q_length, k_length]: key <= query and same segment."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length)
  causal = idx[None, :] <= idx[:, None]  # [q, k]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, q, k]
  return (causal[None] & same)[:, None]


class Attention(nn.Module):
  """Multi-head causal self-attention.

  Params: ``query``/``key``/``value`` kernels ``[embed, heads, head_dim]`` and ``out``
  ``[heads, head_dim, embed]`` with logical axes ``('embed', 'heads', 'kv')``.
  """

  num_heads: int
  head_dim: int
  max_length: int = 2048
  rope_max_wavelength: float = 10_000.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    positions: Array,
    segment_ids: Array | None = None,
    *,
    decode: bool = False,
    token_mask: Array | None = None,
  ) -> Array:
    """Attends causally.

    Args:
      x: [batch, length, embed].
      positions: int [batch, length] positions used for rotary embeddings.
      segment_ids: int [batch, length] packing segments (training / scoring). None = one segment.
      decode: use and extend the KV cache (incremental decoding).
      token_mask: bool [batch, length] (decode only) - False for padding tokens, whose keys are
        never attended to afterwards.
    Returns:
      [batch, length, embed].
    """
    batch, length, embed = x.shape
    qkv_init = nn.with_logical_partitioning(default_kernel_init, ("embed", "heads", "kv"))
    shape = (embed, self.num_heads, self.head_dim)
    wq = self.param("query", qkv_init, shape, jnp.float32)
    wk = self.param("key", qkv_init, shape, jnp.float32)
    wv = self.param("value", qkv_init, shape, jnp.float32)
    wo = self.param(
      "out",
      nn.with_logical_partitioning(default_kernel_init, ("heads", "kv", "embed")),
      (self.num_heads, self.head_dim, embed),
      jnp.float32,
    )
    proj = lambda w: jnp.einsum("bld,dhk->blhk", x, w.astype(self.dtype))
    q, k, v = proj(wq), proj(wk), proj(wv)
    q = rotary_embedding(q, positions, self.rope_max_wavelength)
    k = rotary_embedding(k, positions, self.rope_max_wavelength)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))

    if decode:
      k, v, mask = self._update_cache(k, v, token_mask)
    else:
      if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
      mask = causal_segment_mask(segment_ids)

    logits = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
    logits = jnp.where(mask, logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqs,bshk->bqhk", weights, v)
    ctx = nn.with_logical_constraint(ctx, ("batch", "length", "heads", "kv"))
    return jnp.einsum("blhk,hkd->bld", ctx, wo.astype(self.dtype))

  def _update_cache(self, k: Array, v: Array, token_mask: Array | None):
    """Writes k/v [batch, length, heads, head_dim] at ``cache_index``; returns cached k, v, mask."""
    batch, length = k.shape[:2]
    cache_shape = (batch, self.max_length, self.num_heads, self.head_dim)
    cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, v.dtype)
    cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (batch, self.max_length), bool)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if token_mask is None:
      token_mask = jnp.ones((batch, length), bool)
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
    cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, token_mask, (0, start))
    index.value = start + length
    q_idx = start + jnp.arange(length)  # [length]
    k_idx = jnp.arange(self.max_length)  # [max_length]
    causal = k_idx[None, :] <= q_idx[:, None]  # [length, max_length]
    mask = causal[None, None] & cached_valid.value[:, None, None, :]
    return cached_k.value, cached_v.value, mask
