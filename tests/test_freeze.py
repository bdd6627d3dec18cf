"""Partial freezing: masks by logical axis, and exactly zero updates under real optimizers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax.lifelong import freeze
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

CFG = ModelConfig(
  vocab_size=32,
  embed_dim=16,
  num_layers=2,
  num_heads=2,
  head_dim=8,
  mlp_dim=16,
  num_experts=4,
  top_k=2,
  group_size=16,
  router_jitter=0.1,
)


def _synthetic():
  rng = np.random.default_rng(0)
  params = {
    "blocks": {
      "layer_1": {
        "moe": {
          "wi": rng.standard_normal((3, 4, 5, 6)),
          "router": {"kernel": rng.standard_normal((3, 5, 4))},
        },
        "norm": rng.standard_normal((3, 5)),
      }
    },
    "embed": rng.standard_normal((7, 5)),
  }
  params = jax.tree_util.tree_map(lambda x: x.astype(np.float32), params)
  axes = {
    "blocks": {
      "layer_1": {
        "moe": {
          "wi": P("layers", "expert", "embed", "mlp"),
          "router": {"kernel": P("layers", "embed", "expert")},
        },
        "norm": P("layers", "embed"),
      }
    },
    "embed": P("vocab", "embed"),
  }
  return params, axes


def test_mask_marks_old_expert_slices_router_columns_and_optionally_shared_params():
  params, axes = _synthetic()
  mask = freeze.freeze_mask(params, axes, 2)
  moe = mask["blocks"]["layer_1"]["moe"]
  assert moe["wi"].shape == (1, 4, 1, 1) and moe["router"]["kernel"].shape == (1, 1, 4)
  np.testing.assert_array_equal(moe["wi"].ravel(), [True, True, False, False])
  np.testing.assert_array_equal(moe["router"]["kernel"].ravel(), [True, True, False, False])
  assert not mask["embed"].any() and mask["embed"].shape == (1, 1)
  shared = freeze.freeze_mask(params, axes, 2, freeze_shared=True)
  assert shared["embed"].all() and shared["blocks"]["layer_1"]["norm"].all()
  full = freeze.materialize_mask(shared, params)
  assert full["blocks"]["layer_1"]["moe"]["wi"].shape == (3, 4, 5, 6)
  assert freeze.frozen_count(mask, params) == (
    3 * 2 * 5 * 6 + 3 * 5 * 2,
    sum(x.size for x in jax.tree_util.tree_leaves(params)),
  )
  # Per-layer counts on a scanned leaf: one row per block.
  per_layer = freeze.freeze_mask(params, axes, [1, 2, 3])
  wi = per_layer["blocks"]["layer_1"]["moe"]["wi"]
  assert wi.shape == (3, 4, 1, 1)
  np.testing.assert_array_equal(wi[:, :, 0, 0].sum(axis=1), [1, 2, 3])
  with pytest.raises(ValueError, match="cannot freeze 5 experts"):
    freeze.freeze_mask(params, axes, 5)
  with pytest.raises(Exception, match="rows"):
    freeze.freeze_mask(params, axes, [1, 2])


def test_frozen_entries_ignore_their_optimizer_state_and_weight_decay():
  params, axes = _synthetic()
  mask = freeze.freeze_mask(params, axes, 2, freeze_shared=True)
  tx = freeze.with_frozen(optax.adamw(1e-1, weight_decay=0.5), mask)
  state = tx.init(params)
  # Garbage momentum everywhere: frozen entries must still not move.
  garbage = jax.tree_util.tree_map(lambda m: m + 3.0, state[0].mu)
  state = (state[0]._replace(mu=garbage),) + state[1:]
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  full = freeze.materialize_mask(mask, params)
  for u, m in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(full)):
    u = np.asarray(u)
    assert np.all(u[m] == 0) and np.all(u[~m] != 0)
  # The wrapped optimizer keeps the inner optimizer's state structure (checkpoint compatible).
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(
    optax.adamw(1e-1).init(params)
  )
  assert freeze.with_frozen(tx, None) is tx


def _train(model, params, mask, tx, steps=20):
  tx = freeze.with_frozen(tx, mask)
  toks = jax.random.randint(jax.random.PRNGKey(1), (4, 8), 1, CFG.vocab_size)
  batch = {"decoder_input_tokens": toks, "decoder_target_tokens": jnp.roll(toks, -1, axis=1)}

  @jax.jit
  def run(params, opt_state):
    def step(carry, rng):
      params, opt_state = carry
      grads = jax.grad(lambda p: model.loss(p, batch, train=True, rng=rng)[0])(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    rngs = jax.random.split(jax.random.PRNGKey(2), steps)
    return jax.lax.scan(step, (params, opt_state), rngs)[0][0]

  return run(params, tx.init(params))


@pytest.mark.parametrize("scanned,opt", [(False, "adamw"), (True, "adafactor")])
def test_twenty_training_steps_leave_frozen_slices_and_router_columns_bit_identical(scanned, opt):
  model = LanguageModel(dataclasses.replace(CFG, scan_layers=scanned))
  abstract = model.abstract_params()
  axes = nn.get_partition_spec(abstract)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
    lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), nn.unbox(abstract)
  )
  tx = (
    optax.adamw(1e-2, weight_decay=0.1)
    if opt == "adamw"
    else optax.adafactor(1e-2, min_dim_size_to_factor=4, weight_decay_rate=0.1)
  )
  mask = freeze.freeze_mask(params, axes, 2)
  trained = _train(model, params, mask, tx)
  moe_path = ("blocks", "layer_1", "moe") if scanned else ("layers_1", "moe")

  def moe(tree):
    for k in moe_path:
      tree = tree[k]
    return tree

  ax = 1 if scanned else 0
  for name in ("wi", "wo"):
    old, new = np.asarray(moe(params)[name]), np.asarray(moe(trained)[name])
    np.testing.assert_array_equal(
      np.take(new, [0, 1], axis=ax).view(np.uint32), np.take(old, [0, 1], axis=ax).view(np.uint32)
    )
    assert np.all(np.take(new, [2, 3], axis=ax) != np.take(old, [2, 3], axis=ax))
  old_r = np.asarray(moe(params)["router"]["kernel"])
  new_r = np.asarray(moe(trained)["router"]["kernel"])
  np.testing.assert_array_equal(new_r[..., :2].view(np.uint32), old_r[..., :2].view(np.uint32))
  assert np.all(new_r[..., 2:] != old_r[..., 2:])
  # Shared params train.
  changed = [
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
      jax.tree_util.tree_leaves(params["embed"]), jax.tree_util.tree_leaves(trained["embed"])
    )
  ]
  assert all(changed)
