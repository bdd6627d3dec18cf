"""Decoder: causality, packing isolation, scanned == unscanned, and the dense variant."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

CFG = ModelConfig(
  vocab_size=64,
  embed_dim=32,
  num_layers=4,
  num_heads=2,
  head_dim=16,
  mlp_dim=32,
  num_experts=4,
  group_size=1024,
  eval_capacity_factor=2.0,
)


def _model(**kw):
  m = LanguageModel(dataclasses.replace(CFG, **kw))
  return m, nn.unbox(m.init(jax.random.PRNGKey(0)))


def test_changing_a_future_token_never_changes_earlier_logits():
  # Capacity large enough that routing cannot couple tokens through dropping.
  m, params = _model(eval_capacity_factor=4.0)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 1, 64)
  changed = toks.at[:, 7].set((toks[:, 7] + 5) % 63 + 1)
  a = m.logits(params, {"decoder_input_tokens": toks, "decoder_target_tokens": toks})
  b = m.logits(params, {"decoder_input_tokens": changed, "decoder_target_tokens": changed})
  np.testing.assert_allclose(np.asarray(a[:, :7]), np.asarray(b[:, :7]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


def test_packed_segments_never_attend_across_each_other():
  m, params = _model(eval_capacity_factor=4.0)
  s1 = jax.random.randint(jax.random.PRNGKey(2), (5,), 1, 64)
  s2 = jax.random.randint(jax.random.PRNGKey(3), (7,), 1, 64)
  packed = {
    "decoder_input_tokens": jnp.concatenate([s1, s2])[None],
    "decoder_target_tokens": jnp.concatenate([s1, s2])[None],
    "decoder_segment_ids": jnp.array([[1] * 5 + [2] * 7]),
    "decoder_positions": jnp.array([list(range(5)) + list(range(7))]),
  }
  alone = {"decoder_input_tokens": s2[None], "decoder_target_tokens": s2[None]}
  a = m.logits(params, packed)[0, 5:]
  b = m.logits(params, alone)[0]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # Replacing segment 1 entirely leaves segment 2 untouched.
  other = dict(packed, decoder_input_tokens=packed["decoder_input_tokens"].at[0, :5].set(3))
  c = m.logits(params, other)[0, 5:]
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)


def _scan_to_unscanned(scanned, moe_every):
  out = {k: v for k, v in scanned.items() if k != "blocks"}
  blocks = scanned["blocks"]
  num_blocks = jax.tree_util.tree_leaves(blocks)[0].shape[0]
  for b in range(num_blocks):
    for j in range(moe_every):
      out[f"layers_{b * moe_every + j}"] = jax.tree_util.tree_map(
        lambda x: x[b], blocks[f"layer_{j}"]
      )
  return out


def test_scanned_and_unscanned_stacks_compute_the_same_function():
  m_scan, p_scan = _model(scan_layers=True)
  m_flat, _ = _model(scan_layers=False)
  p_flat = _scan_to_unscanned(p_scan, CFG.moe_every)
  toks = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 1, 64)
  batch = {"decoder_input_tokens": toks, "decoder_target_tokens": toks}
  la, ma = m_scan.loss(p_scan, batch)
  lb, mb = m_flat.loss(p_flat, batch)
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(ma["moe"]["expert_fraction"]),
    np.asarray(mb["moe"]["expert_fraction"]),
    rtol=1e-5,
    atol=1e-6,
  )
  assert ma["moe"]["expert_fraction"].shape == (2, 4)
  axes = m_scan.params_logical_axes()
  assert tuple(axes["blocks"]["layer_1"]["moe"]["wi"]) == ("layers", "expert", "embed", "mlp")


def test_loss_is_weighted_cross_entropy_plus_router_losses():
  m, params = _model()
  toks = jax.random.randint(jax.random.PRNGKey(5), (2, 6), 1, 64)
  weights = jnp.array([[1, 1, 0, 0, 1, 1], [0.5, 1, 1, 1, 1, 0]], jnp.float32)
  batch = {
    "decoder_input_tokens": toks,
    "decoder_target_tokens": toks,
    "decoder_loss_weights": weights,
  }
  loss, metrics = m.loss(params, batch)
  logp = jax.nn.log_softmax(m.logits(params, batch))
  ll = np.take_along_axis(np.asarray(logp), np.asarray(toks)[..., None], -1)[..., 0]
  ce = -np.sum(ll * np.asarray(weights)) / np.sum(np.asarray(weights))
  np.testing.assert_allclose(float(metrics["cross_entropy"]), ce, rtol=1e-5)
  expected = (
    ce
    + CFG.aux_loss_weight * float(metrics["aux_loss"])
    + CFG.router_z_loss_weight * float(metrics["z_loss"])
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(m.score(params, batch)), np.sum(ll * np.asarray(weights), -1), rtol=1e-5
  )


def test_dense_model_has_no_experts_and_zero_router_losses():
  m, params = _model(num_experts=0)
  assert not any("moe" in k for k in params)
  toks = jnp.ones((1, 4), jnp.int32)
  _, metrics = m.loss(params, {"decoder_input_tokens": toks, "decoder_target_tokens": toks})
  assert float(metrics["aux_loss"]) == 0.0 and "moe" not in metrics


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("top_k", 5, "top_k=5 exceeds num_experts=4"),
    ("dtype", "int8", "dtype"),
    ("num_layers", 3, "multiple of moe_every"),
  ],
)
def test_bad_model_config_is_a_clear_error(field, value, match):
  kw = {field: value}
  if field == "num_layers":
    kw["scan_layers"] = True
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(CFG, **kw)
