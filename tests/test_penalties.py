"""L2 / EWC anchor penalties and the empirical Fisher, against NumPy."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax import param_tree
from lifelong_moe_jax.lifelong import penalties

E, N = 3, 2


def _params(seed=0, num_experts=E):
  rng = np.random.default_rng(seed)
  params = {
    "moe": {
      "wi": rng.standard_normal((num_experts, 4, 5)).astype(np.float32),
      "router": rng.standard_normal((4, num_experts)).astype(np.float32),
    },
    "norm": rng.standard_normal((4,)).astype(np.float32),
  }
  axes = {
    "moe": {"wi": P("expert", "embed", "mlp"), "router": P("embed", "expert")},
    "norm": P("embed"),
  }
  return params, axes


def _flat(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def test_l2_penalty_matches_numpy_and_anchors_only_old_slices_after_expansion():
  anchor_params, axes = _params(0)
  anchor = penalties.l2_anchor(anchor_params)
  current, _ = _params(1)
  reg = penalties.L2Penalty(weight=0.3, anchor=anchor)
  term, metrics = reg(current, None, None, anchor, None)
  expected = sum(((c - a) ** 2).sum() for c, a in zip(_flat(current), _flat(anchor_params)))
  np.testing.assert_allclose(float(metrics["distance"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(term), 0.15 * expected, rtol=1e-5)

  grown = anchor.expand_to(axes, N)
  imp = grown.importance["moe"]
  assert imp["wi"].shape == (E + N, 1, 1) and imp["router"].shape == (1, E + N)
  np.testing.assert_array_equal(np.asarray(imp["wi"]).ravel(), [1, 1, 1, 0, 0])
  assert grown.anchor["moe"]["wi"].shape == (E + N, 4, 5)
  expanded, _ = _params(2, num_experts=E + N)
  distance = penalties.quadratic_distance(expanded, grown)
  ex = {k: np.asarray(v, np.float64) for k, v in expanded["moe"].items()}
  an = {k: np.asarray(v, np.float64) for k, v in anchor_params["moe"].items()}
  expected = (
    ((ex["wi"][:E] - an["wi"]) ** 2).sum()
    + ((ex["router"][:, :E] - an["router"]) ** 2).sum()
    + ((np.asarray(expanded["norm"], np.float64) - anchor_params["norm"]) ** 2).sum()
  )
  np.testing.assert_allclose(float(distance), expected, rtol=1e-5)
  # Broadcast (size-1) importance dimensions are not sharded.
  grown_axes = grown.logical_axes(axes)
  assert tuple(grown_axes.importance["moe"]["wi"]) == ("expert", None, None)
  assert tuple(grown_axes.anchor["moe"]["wi"]) == ("expert", "embed", "mlp")
  ctx = types.SimpleNamespace(params=expanded, params_axes=axes)
  state, state_axes = penalties.L2Penalty(1.0, grown).init_state(ctx)
  assert state is grown and state_axes == grown_axes
  with pytest.raises(ValueError, match="expand_to"):
    penalties.L2Penalty(1.0, anchor).init_state(ctx)
  with pytest.raises(ValueError, match="needs an anchor"):
    penalties.L2Penalty(1.0).init_state(ctx)


def test_ewc_penalty_value_and_gradient_match_numpy():
  anchor_params, axes = _params(0)
  fisher = jax.tree_util.tree_map(lambda x: np.abs(x) * 0.5, _params(5)[0])
  anchor = penalties.ewc_anchor(anchor_params, fisher).expand_to(axes, N)
  assert anchor.importance["moe"]["wi"].shape == (E + N, 4, 5)
  assert not np.any(np.asarray(anchor.importance["moe"]["wi"][E:]))
  current, _ = _params(3, num_experts=E + N)
  reg = penalties.EWCPenalty(weight=2.0)
  (term, metrics), grads = jax.value_and_grad(
    lambda p: reg(p, None, None, anchor, None), has_aux=True
  )(current)
  f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  f_wi, f_r = f64(fisher["moe"]["wi"]), f64(fisher["moe"]["router"])
  c_wi, c_r = f64(current["moe"]["wi"]), f64(current["moe"]["router"])
  a_wi, a_r = anchor_params["moe"]["wi"], anchor_params["moe"]["router"]
  d_norm = np.asarray(current["norm"], np.float64) - anchor_params["norm"]
  expected = (
    (f_wi * (c_wi[:E] - a_wi) ** 2).sum()
    + (f_r * (c_r[:, :E] - a_r) ** 2).sum()
    + (fisher["norm"] * d_norm**2).sum()
  )
  np.testing.assert_allclose(float(metrics["distance"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(term), expected, rtol=1e-5)  # weight / 2 = 1
  want_wi = np.zeros_like(c_wi)
  want_wi[:E] = 2.0 * f_wi * (c_wi[:E] - a_wi)
  np.testing.assert_allclose(np.asarray(grads["moe"]["wi"]), want_wi, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads["norm"]), 2.0 * fisher["norm"] * d_norm, rtol=1e-5)
  with pytest.raises(ValueError, match="does not match"):
    bad = {"moe": {"wi": np.ones(3), "router": fisher["moe"]["router"]}, "norm": fisher["norm"]}
    penalties.ewc_anchor(anchor_params, bad)


class _LinearModel:
  """Duck-typed model: loss = mean((x @ w - y)^2) reported as the cross-entropy."""

  def loss(self, params, batch):
    err = batch["x"] @ params["w"] - batch["y"]
    value = jnp.mean(err**2)
    return value + 1.0, {"cross_entropy": value}


def test_estimate_fisher_is_the_mean_squared_batch_gradient():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3,)).astype(np.float32)
  batches = [
    {
      "x": rng.standard_normal((8, 3)).astype(np.float32),
      "y": rng.standard_normal((8,)).astype(np.float32),
    }
    for _ in range(4)
  ]
  fisher = penalties.estimate_fisher(_LinearModel(), {"w": w}, iter(batches), num_batches=3)
  grads = [2.0 / 8 * b["x"].T.astype(np.float64) @ (b["x"] @ w - b["y"]) for b in batches[:3]]
  np.testing.assert_allclose(np.asarray(fisher["w"]), np.mean(np.square(grads), axis=0), rtol=1e-5)
  assert fisher["w"].dtype == jnp.float32
  with pytest.raises(ValueError, match="no batches"):
    penalties.estimate_fisher(_LinearModel(), {"w": w}, [])
  with pytest.raises(ValueError, match="loss must be"):
    penalties.estimate_fisher(_LinearModel(), {"w": w}, batches, loss="nll")


def test_anchor_expansion_keeps_sharding():
  params, axes = _params(0, num_experts=4)
  from lifelong_moe_jax import partitioning as pt  # pylint: disable=import-outside-toplevel

  part = pt.Partitioner(pt.create_mesh(pt.MeshConfig(data=2, expert=4, model=1)))
  sharded = jax.device_put(params, part.shardings(axes))
  grown = penalties.l2_anchor(sharded).expand_to(axes, 4)
  wi = grown.anchor["moe"]["wi"]
  assert wi.shape == (8, 4, 5) and {s.data.shape for s in wi.addressable_shards} == {(2, 4, 5)}
  np.testing.assert_array_equal(np.asarray(wi[:4]), params["moe"]["wi"])
  assert param_tree.expert_axis(axes["moe"]["router"]) == 1
