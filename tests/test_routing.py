"""Router: top-k dispatch/combine vs a naive per-token loop; aux and z losses by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax.layers import routing


def naive_route(logits, top_k, capacity, token_mask, normalize, batch_prioritized=False):
  """Reference: per group, fill expert slots choice-rank by choice-rank, token by token (tokens
  by decreasing top-1 probability with ``batch_prioritized``)."""
  logits = np.asarray(logits, np.float64)
  G, S, E = logits.shape
  dispatch = np.zeros((G, S, E, capacity))
  combine = np.zeros((G, S, E, capacity))
  for g in range(G):
    probs = np.exp(logits[g] - logits[g].max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choices = []
    for s in range(S):
      order = sorted(range(E), key=lambda e: (-probs[s, e], e))[:top_k]
      gates = np.array([probs[s, e] for e in order])
      if normalize:
        gates = gates / gates.sum()
      choices.append((order, gates))
    fill = [0] * E
    order = range(S)
    if batch_prioritized:
      order = sorted(range(S), key=lambda s: (-probs[s].max(), s))
    for k in range(top_k):
      for s in order:
        if not token_mask[g, s]:
          continue
        e, gate = choices[s][0][k], choices[s][1][k]
        if fill[e] < capacity:
          dispatch[g, s, e, fill[e]] = 1
          combine[g, s, e, fill[e]] = gate
        fill[e] += 1
  return dispatch, combine


@pytest.mark.parametrize(
  "top_k,capacity,normalize", [(2, 2, True), (1, 1, False), (2, 5, False), (3, 3, True)]
)
def test_dispatch_and_combine_match_naive_reference(top_k, capacity, normalize):
  rng = np.random.default_rng(top_k * 10 + capacity)
  logits = rng.normal(size=(3, 7, 4)).astype(np.float32)
  mask = rng.random((3, 7)) > 0.2
  out = routing.route_top_k(
    jnp.asarray(logits),
    top_k=top_k,
    capacity=capacity,
    token_mask=jnp.asarray(mask),
    normalize_gates=normalize,
  )
  dispatch, combine = naive_route(logits, top_k, capacity, mask, normalize)
  np.testing.assert_array_equal(np.asarray(out.dispatch_mask), dispatch.astype(bool))
  np.testing.assert_allclose(np.asarray(out.combine_weights), combine, rtol=1e-5, atol=1e-6)
  assignments = mask.sum() * top_k
  kept = dispatch.sum()
  np.testing.assert_allclose(float(out.dropped_fraction), 1 - kept / assignments, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.tokens_per_expert), dispatch.sum((0, 1, 3)))
  if capacity < 7 * top_k / 4:
    assert float(out.dropped_fraction) > 0  # the small capacities really do drop


def test_aux_and_z_loss_hand_computed():
  # One group, two tokens, two experts, top-1.
  logits = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
  out = routing.route_top_k(logits, top_k=1, capacity=2, normalize_gates=False)
  p0 = np.array([math.e / (math.e + 1), 1 / (math.e + 1)])
  p1 = np.array([1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)])
  f = np.array([0.5, 0.5])  # token 0 -> expert 0, token 1 -> expert 1
  p = (p0 + p1) / 2
  np.testing.assert_allclose(float(out.aux_loss), 2 * np.sum(f * p), rtol=1e-6)
  z = [math.log(math.e + 1), math.log(1 + math.e**2)]
  np.testing.assert_allclose(float(out.z_loss), np.mean(np.square(z)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.expert_fraction), f)
  assert float(out.dropped_fraction) == 0.0


def test_balanced_routing_has_unit_aux_loss():
  # Uniform router probabilities and perfectly spread choices give exactly 1.
  logits = jnp.zeros((1, 4, 4)) + jnp.eye(4)[None] * 1e-3
  out = routing.route_top_k(logits, top_k=1, capacity=1)
  np.testing.assert_allclose(float(out.aux_loss), 1.0, rtol=1e-3)


def test_capacity_formula():
  assert routing.expert_capacity(group_size=64, num_experts=8, top_k=2, capacity_factor=1.25) == 20
  assert routing.expert_capacity(group_size=10, num_experts=4, top_k=2, capacity_factor=1.0) == 5
  assert routing.expert_capacity(group_size=3, num_experts=64, top_k=2, capacity_factor=1.0) == 1


def test_jitter_changes_routing_only_in_training():
  router = routing.TopKRouter(num_experts=4, top_k=2, jitter=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
  params = router.init({"params": jax.random.PRNGKey(1)}, x, capacity=8)
  a = router.apply(params, x, capacity=8, train=False)
  b = router.apply(params, x, capacity=8, train=False)
  c = router.apply(params, x, capacity=8, train=True, rngs={"jitter": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(np.asarray(a.combine_weights), np.asarray(b.combine_weights))
  assert not np.allclose(np.asarray(a.combine_weights), np.asarray(c.combine_weights))


def _dispatch_from_sorted(out, num_experts, capacity):
  """The one-hot dispatch mask [G, S, E, C] implied by a SortedRouting."""
  expert = np.asarray(out.expert_index)
  slot, kept = np.asarray(out.slot), np.asarray(out.kept)
  dispatch = np.zeros(expert.shape[:2] + (num_experts, capacity), bool)
  for g, s, k in zip(*np.nonzero(kept)):
    dispatch[g, s, expert[g, s, k], slot[g, s, k]] = True
  return dispatch


@pytest.mark.parametrize("batch_prioritized", [False, True])
@pytest.mark.parametrize("top_k,capacity", [(2, 2), (1, 1), (2, 5), (3, 3)])
def test_sorted_routing_matches_one_hot_routing_and_reference(top_k, capacity, batch_prioritized):
  rng = np.random.default_rng(top_k * 10 + capacity)
  logits = rng.normal(size=(3, 7, 4)).astype(np.float32)
  mask = rng.random((3, 7)) > 0.2
  kw = dict(
    top_k=top_k,
    capacity=capacity,
    token_mask=jnp.asarray(mask),
    normalize_gates=True,
    batch_prioritized=batch_prioritized,
  )
  dense = routing.route_top_k(jnp.asarray(logits), **kw)
  sparse = routing.route_top_k_sorted(jnp.asarray(logits), **kw)
  dispatch, combine = naive_route(logits, top_k, capacity, mask, True, batch_prioritized)
  np.testing.assert_array_equal(np.asarray(dense.dispatch_mask), dispatch.astype(bool))
  np.testing.assert_allclose(np.asarray(dense.combine_weights), combine, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(_dispatch_from_sorted(sparse, 4, capacity), dispatch.astype(bool))
  for name in ("aux_loss", "z_loss", "expert_fraction", "tokens_per_expert", "dropped_fraction"):
    np.testing.assert_array_equal(
      np.asarray(getattr(sparse, name)), np.asarray(getattr(dense, name)), err_msg=name
    )
  # sorted_assignments lists each group's routed assignments by expert, then priority.
  order = np.asarray(sparse.sorted_assignments)
  experts = np.asarray(sparse.expert_index)
  for g in range(3):
    routed = [a for a in order[g] if mask[g, a % 7]]
    assert order[g, : len(routed)].tolist() == routed
    assert [experts[g, a % 7, a // 7] for a in routed] == sorted(
      experts[g, a % 7, a // 7] for a in routed
    )


def test_sorted_routing_dropless_keeps_everything():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 3)), jnp.float32)
  out = routing.route_top_k_sorted(logits, top_k=2, capacity=None)
  assert np.asarray(out.kept).all()
  assert float(out.dropped_fraction) == 0.0
  np.testing.assert_array_equal(
    np.asarray(out.tokens_per_expert), np.asarray(out.expert_count).sum(0)
  )
