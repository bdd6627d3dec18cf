"""MoeLayer against a naive reference that runs every token through its chosen experts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax.layers.moe import MoeLayer, choose_group_size


def naive_moe(x, params, top_k, normalize, token_mask):
  x = np.asarray(x, np.float64)
  kernel = np.asarray(params["router"]["kernel"], np.float64)
  wi, wo = np.asarray(params["wi"], np.float64), np.asarray(params["wo"], np.float64)
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    for l in range(x.shape[1]):
      if not token_mask[b, l]:
        continue
      logits = x[b, l] @ kernel
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      chosen = np.argsort(-probs, kind="stable")[:top_k]
      gates = probs[chosen] / (probs[chosen].sum() if normalize else 1.0)
      for e, gate in zip(chosen, gates):
        h = np.asarray(nn.gelu(jnp.asarray(x[b, l] @ wi[e])), np.float64)
        out[b, l] += gate * (h @ wo[e])
  return out


@pytest.mark.parametrize(
  "top_k,normalize,group_size", [(2, True, 8), (1, False, 32), (2, False, 16)]
)
def test_moe_equals_naive_reference_without_drops(top_k, normalize, group_size):
  layer = MoeLayer(
    num_experts=4,
    mlp_dim=16,
    top_k=top_k,
    group_size=group_size,
    eval_capacity_factor=4.0 / top_k,
    normalize_gates=normalize,
  )  # capacity = group
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
  mask = np.ones((2, 16), bool)
  mask[1, 12:] = False  # padding tokens are not routed and produce zeros
  variables = layer.init(jax.random.PRNGKey(1), x, jnp.asarray(mask))
  params = nn.unbox(variables["params"])
  y, state = layer.apply({"params": params}, x, jnp.asarray(mask), mutable=["intermediates"])
  np.testing.assert_allclose(
    np.asarray(y), naive_moe(x, params, top_k, normalize, mask), rtol=1e-4, atol=1e-5
  )
  assert float(state["intermediates"]["dropped_fraction"][0]) == 0.0
  assert params["wi"].shape == (4, 8, 16) and params["wo"].shape == (4, 16, 8)
  spec = nn.get_partition_spec(variables["params"])
  assert tuple(spec["wi"]) == ("expert", "embed", "mlp")
  assert tuple(spec["wo"]) == ("expert", "mlp", "embed")
  assert tuple(spec["router"]["kernel"]) == ("embed", "expert")


def test_small_capacity_drops_tokens_and_they_pass_as_zero():
  layer = MoeLayer(num_experts=4, mlp_dim=16, top_k=1, group_size=32, eval_capacity_factor=0.25)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 8))
  variables = layer.init(jax.random.PRNGKey(1), x)
  y, state = layer.apply(variables, x, mutable=["intermediates"])
  dropped = float(state["intermediates"]["dropped_fraction"][0])
  # capacity = ceil(0.25 * 1 * 32 / 4) = 2 slots x 4 experts = 8 of 32 tokens kept.
  np.testing.assert_allclose(dropped, 24 / 32)
  zero_rows = np.sum(np.all(np.asarray(y[0]) == 0, axis=-1))
  assert zero_rows == 24


def test_group_size_choice():
  assert choose_group_size(128, 64) == 64
  assert choose_group_size(96, 64) == 48
  assert choose_group_size(10, 256) == 10
