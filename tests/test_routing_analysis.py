"""Routing analysis: top-1 / top-k assignment counts per expert, aggregated by owning phase.

Hand counts on constructed routers: a MoE layer whose router logits are the input itself (every
dispatch), and a 2-MoE-layer model whose router inputs are captured and whose choices are counted
in numpy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax.eval import routing_analysis
from lifelong_moe_jax.layers import moe as moe_lib
from lifelong_moe_jax.layers import routing
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig

E = 4
# Router logits = x (identity kernel): each token's first and second choice are known.
LOGITS = np.array(
  [
    [3, 2, 0, 0],
    [0, 3, 2, 0],
    [0, 0, 2, 3],
    [3, 0, 0, 2],
    [0, 2, 3, 0],
    [2, 3, 0, 0],
    [3, 0, 2, 0],
    [0, 0, 3, 2],
  ],
  np.float32,
)
MASK = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)  # the last two tokens are padding


def _hand_counts(logits, mask, k):
  order = np.argsort(-logits, axis=-1, kind="stable")
  top1 = np.bincount(order[mask, 0], minlength=logits.shape[-1]).astype(float)
  topk = np.bincount(order[mask, :k].ravel(), minlength=logits.shape[-1]).astype(float)
  return top1, topk


def test_route_top_k_top1_fraction_is_a_hand_count():
  top1, topk = _hand_counts(LOGITS, MASK, 2)
  assert top1.tolist() == [2, 2, 1, 1] and topk.tolist() == [3, 4, 3, 2]
  for fn in (routing.route_top_k, routing.route_top_k_sorted):
    out = fn(jnp.asarray(LOGITS)[None], top_k=2, capacity=8, token_mask=jnp.asarray(MASK)[None])
    np.testing.assert_allclose(np.asarray(out.top1_fraction), top1 / MASK.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.expert_fraction), topk / (2 * MASK.sum()), rtol=1e-6)


@pytest.mark.parametrize("dispatch", moe_lib.DISPATCHES)
def test_moe_layer_sows_top1_fraction_in_every_dispatch(dispatch):
  x = jnp.asarray(np.concatenate([LOGITS, LOGITS[::-1]])).reshape(2, 8, E)
  mask = jnp.asarray(np.concatenate([MASK, MASK[::-1]])).reshape(2, 8)
  layer = moe_lib.MoeLayer(
    num_experts=E, mlp_dim=8, top_k=2, group_size=8, dispatch=dispatch, eval_capacity_factor=1.0
  )  # capacity 4: some assignments dropped
  params = nn.unbox(layer.init(jax.random.PRNGKey(0), x, mask)["params"])
  params["router"]["kernel"] = jnp.eye(E, dtype=jnp.float32)
  _, state = layer.apply({"params": params}, x, mask, mutable=["intermediates"])
  sown = state["intermediates"]
  top1, topk = _hand_counts(np.asarray(x).reshape(-1, E), np.asarray(mask).reshape(-1), 2)
  routed = float(np.asarray(mask).sum())
  np.testing.assert_allclose(np.asarray(sown["top1_fraction"][0]), top1 / routed, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sown["expert_fraction"][0]), topk / (2 * routed), rtol=1e-6)


def test_phase_shares_and_entry():
  usage = np.array([[0.5, 0.1, 0.3, 0.1], [0.0, 0.0, 0.25, 0.75]])
  slices = {"A": (0, 2), "B": (2, 2), "C": (2, 4)}  # B added no experts
  shares = routing_analysis.phase_shares(usage, slices)
  np.testing.assert_allclose(shares, [[0.6, 0.0, 0.4], [0.0, 0.0, 1.0]])
  entry = routing_analysis.routing_entry(usage, usage * 3, slices)  # counts are normalised
  assert entry["phases"] == ["A", "B", "C"]
  assert entry["top1"] == pytest.approx({"A": 0.3, "B": 0.0, "C": 0.7})
  assert entry["topk"] == pytest.approx(entry["top1"])
  np.testing.assert_allclose(entry["per_layer"]["top1"], shares)
  with pytest.raises(ValueError, match="do not cover"):
    routing_analysis.phase_shares(usage, {"A": (0, 3)})


def _model():
  config = ModelConfig(
    vocab_size=64,
    embed_dim=16,
    num_layers=4,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_experts=E,
    moe_every=2,
    top_k=2,
    group_size=16,
    eval_capacity_factor=1.0,
    max_length=32,
    dtype="float32",
  )
  model = lm.LanguageModel(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  # A constructed router: random kernels of our choice (scale 2: choices far from ties, while no
  # router probability underflows to 0, where top-k would pick by index).
  for i, key in enumerate(("layers_1", "layers_3")):
    params[key]["moe"]["router"]["kernel"] = 2.0 * jax.random.normal(
      jax.random.PRNGKey(10 + i), (16, E)
    )
  return model, params


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(3):
    tokens = rng.integers(1, 64, size=(2, 16)).astype(np.int32)
    tokens[:, 12:] = 0  # padding: not routed, not counted
    out.append({"decoder_input_tokens": tokens, "decoder_target_tokens": tokens})
  return out


def test_routing_counts_equal_a_hand_count_on_a_constructed_router():
  model, params = _model()
  batches = _batches()
  want_top1, want_topk = np.zeros((2, E)), np.zeros((2, E))
  capture = lambda mdl, _: mdl.name == "pre_mlp_norm"  # the MoE layers' input
  for batch in batches:
    tokens = jnp.asarray(batch["decoder_input_tokens"])
    mask = np.asarray(tokens) > 0
    _, state = model.module.apply(
      {"params": params},
      tokens,
      None,
      None,
      jnp.asarray(mask),
      capture_intermediates=capture,
      mutable=["intermediates"],
    )
    for m, key in enumerate(("layers_1", "layers_3")):
      h = np.asarray(state["intermediates"][key]["pre_mlp_norm"]["__call__"][0], np.float64)
      logits = h.reshape(-1, 16) @ np.asarray(params[key]["moe"]["router"]["kernel"], np.float64)
      top1, topk = _hand_counts(logits, mask.reshape(-1), 2)
      want_top1[m] += top1
      want_topk[m] += topk
  counts = routing_analysis.routing_counts(model, params, batches)
  assert counts["tokens"] == 3 * 2 * 12
  np.testing.assert_allclose(counts["top1"], want_top1, atol=1e-3)
  np.testing.assert_allclose(counts["topk"], want_topk, atol=1e-3)
  assert want_top1.sum(axis=1).tolist() == [72, 72] and want_topk.sum(axis=1).tolist() == [144, 144]

  slices = {"A": (0, 2), "B": (2, 3), "C": (3, 4)}
  entry = routing_analysis.analyze(model, params, batches, slices)
  for key, want in (("top1", want_top1), ("topk", want_topk)):
    per_layer = np.stack([want[:, 0:2].sum(1), want[:, 2], want[:, 3]], axis=1)
    per_layer /= per_layer.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(entry["per_layer"][key], per_layer, atol=1e-6)
    assert sum(entry[key].values()) == pytest.approx(1.0)  # sums to 1 per distribution
    assert entry[key] == pytest.approx(dict(zip("ABC", per_layer.mean(axis=0))))


def test_from_evaluation_uses_the_phase_evaluators_usage():
  evals = {
    "t": {"expert_usage": [[0.25, 0.25, 0.25, 0.25]], "expert_usage_top1": [[1, 0, 0, 0]]},
    "dense": {"loss": 1.0},
  }
  out = routing_analysis.from_evaluation(evals, {"A": (0, 1), "B": (1, 4)})
  assert list(out) == ["t"]
  assert out["t"]["top1"] == {"A": 1.0, "B": 0.0} and out["t"]["topk"] == {"A": 0.25, "B": 0.75}
