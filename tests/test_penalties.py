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
  fisher = penalties.estimate_fisher(
    _LinearModel(), {"w": w}, iter(batches), num_batches=3, estimator="batch_gradient"
  )
  grads = [2.0 / 8 * b["x"].T.astype(np.float64) @ (b["x"] @ w - b["y"]) for b in batches[:3]]
  np.testing.assert_allclose(np.asarray(fisher["w"]), np.mean(np.square(grads), axis=0), rtol=1e-5)
  assert fisher["w"].dtype == jnp.float32
  with pytest.raises(ValueError, match="no batches"):
    penalties.estimate_fisher(_LinearModel(), {"w": w}, [])
  with pytest.raises(ValueError, match="loss must be"):
    penalties.estimate_fisher(_LinearModel(), {"w": w}, batches, loss="nll")
  with pytest.raises(ValueError, match="estimator must be"):
    penalties.estimate_fisher(_LinearModel(), {"w": w}, batches, estimator="per_example")
  with pytest.raises(ValueError, match="log-likelihood only"):
    penalties.estimate_fisher(_LinearModel(), {"w": w}, batches, loss="total")


def _tiny_lm():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from lifelong_moe_jax.models import lm  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel

  config = ModelConfig(
    vocab_size=12, embed_dim=8, num_layers=1, num_heads=2, head_dim=4, mlp_dim=16, max_length=8
  )
  model = lm.LanguageModel(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map(lambda p: p * 3.0, params)  # peakier predictions
  rng = np.random.default_rng(1)
  targets = rng.integers(2, 12, size=(2, 5)).astype(np.int32)
  batch = {
    "decoder_target_tokens": targets,
    "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1),
    "decoder_loss_weights": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32),
  }
  return model, params, batch


def _token_grads(model, params, batch):
  """``grad(t, y)``: the gradient of ``-log p(y | x_<t)`` at flat token ``t``, one at a time."""

  def nll(p, t, y):
    logp = jax.nn.log_softmax(model.logits(p, batch).reshape(-1, 12), axis=-1)
    return -logp[t, y]

  return jax.jit(jax.grad(nll))


def _sq_sum(tree):
  return sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in jax.tree.leaves(tree))


def test_sampled_token_fisher_equals_a_per_token_loop_with_the_same_labels():
  model, params, batch = _tiny_lm()
  key = jax.random.PRNGKey(5)
  fisher = penalties.estimate_fisher(model, params, iter([batch]), rng=key)
  logits = model.logits(params, batch)
  labels = np.asarray(jax.random.categorical(jax.random.fold_in(key, 0), logits, axis=-1))
  grad = _token_grads(model, params, batch)
  weights = batch["decoder_loss_weights"].reshape(-1)
  total = None
  for t in np.flatnonzero(weights):
    g = grad(params, int(t), int(labels.reshape(-1)[t]))
    total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
  want = jax.tree_util.tree_map(lambda g: np.square(np.asarray(g, np.float64)) / 8.0, total)
  for got, w in zip(jax.tree.leaves(fisher), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), w, rtol=2e-3, atol=1e-6 * float(np.max(w)) + 1e-12)


def test_sampled_token_fisher_is_unbiased_for_the_per_token_fisher():
  """Averaged over label draws it approaches ``(1/N) sum_t sum_y p_t(y) g_t(y)^2``, enumerated
  exactly."""
  model, params, batch = _tiny_lm()
  probs = np.asarray(jax.nn.softmax(model.logits(params, batch), axis=-1)).reshape(-1, 12)
  grad = _token_grads(model, params, batch)
  weights = batch["decoder_loss_weights"].reshape(-1)
  exact = 0.0
  for t in np.flatnonzero(weights):
    for y in range(12):
      exact += probs[t, y] * _sq_sum(grad(params, int(t), y))
  exact /= weights.sum()
  draws = 400
  fisher = penalties.estimate_fisher(model, params, [batch] * draws, rng=jax.random.PRNGKey(2))
  estimate = sum(float(np.sum(np.asarray(f, np.float64))) for f in jax.tree.leaves(fisher))
  assert estimate == pytest.approx(exact, rel=0.1)


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


def test_ewc_weight_and_fisher_accumulation_over_phases():
  from lifelong_moe_jax.lifelong import ewc_fisher  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong import method_options  # pylint: disable=import-outside-toplevel

  phases = [types.SimpleNamespace(steps=s) for s in (1500, 150, 300)]
  schedule = types.SimpleNamespace(phases=phases)
  assert ewc_fisher.bayesian_weight(schedule, 1) == 10.0
  assert ewc_fisher.bayesian_weight(schedule, 2) == 1650 / 300
  options = method_options.MethodOptions()
  assert options.ewc_weight is None and options.fisher_estimator == "sampled_tokens"
  assert ewc_fisher.ewc_weight(schedule, 1, options) == 10.0
  assert ewc_fisher.ewc_weight(schedule, 1, method_options.MethodOptions(ewc_weight=3.0)) == 3.0
  earlier, last = {"a": np.array([2.0, 4.0])}, {"a": np.array([13.0, 4.0])}
  # Phase 2 uses phase 0's Fisher (1500 steps) and phase 1's (150 steps), step-weighted.
  mean = ewc_fisher.accumulate_fisher(earlier, last, schedule, 2, "sampled_tokens")
  np.testing.assert_allclose(mean["a"], [(1500 * 2 + 150 * 13) / 1650, 4.0])
  summed = ewc_fisher.accumulate_fisher(earlier, last, schedule, 2, "batch_gradient")
  np.testing.assert_allclose(summed["a"], [15.0, 8.0])
  assert method_options.LEGACY_OPTION_VALUES["fisher_estimator"] == "batch_gradient"
  with pytest.raises(method_options.MethodError, match="Bayesian weight"):
    method_options.MethodOptions(fisher_estimator="batch_gradient")
  with pytest.raises(method_options.MethodError, match="fisher_estimator must be"):
    method_options.MethodOptions(fisher_estimator="empirical")
