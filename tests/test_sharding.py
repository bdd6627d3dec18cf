"""Expert parallelism on 8 fake CPU devices: sharded == single device, experts split, all-to-all."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

CFG = ModelConfig(
  vocab_size=128,
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_experts=8,
  group_size=16,
  train_capacity_factor=1.5,
)


def _setup():
  model = LanguageModel(CFG)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  toks = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 1, CFG.vocab_size)
  batch = {"decoder_input_tokens": toks, "decoder_target_tokens": jnp.roll(toks, -1, axis=1)}
  return model, params, batch


def _grad_fn(model):
  def fn(params, batch, rng):
    return jax.value_and_grad(lambda p: model.loss(p, batch, train=True, rng=rng)[0])(params)

  return fn


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 4, 2)])
def test_sharded_loss_and_grads_equal_single_device(mesh_shape):
  assert jax.device_count() == 8
  model, params, batch = _setup()
  rng = jax.random.PRNGKey(7)
  one = jax.devices()[0]
  ref_loss, ref_grads = jax.jit(_grad_fn(model))(
    jax.device_put(params, one), jax.device_put(batch, one), rng
  )
  part = pt.Partitioner(pt.create_mesh(pt.MeshConfig(*mesh_shape)))
  with part.context():
    shardings = part.shardings(model.params_logical_axes())
    sharded_params = jax.device_put(params, shardings)
    sharded_batch = jax.device_put(batch, part.batch_sharding())
    step = jax.jit(
      _grad_fn(model),
      in_shardings=(shardings, part.batch_sharding(), None),
      out_shardings=(part.replicated(), shardings),
    )
    loss, grads = step(sharded_params, sharded_batch, rng)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for (path, g), r in zip(
    jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(ref_grads)
  ):
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(r), rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path)
    )
  # Each device holds num_experts / 4 experts (and half the mlp width when model=2).
  wi = sharded_params["layers_1"]["moe"]["wi"]
  expect = (CFG.num_experts // 4, CFG.embed_dim, CFG.mlp_dim // mesh_shape[2])
  assert {s.data.shape for s in wi.addressable_shards} == {expect}
  assert {s.data.shape for s in grads["layers_1"]["moe"]["wo"].addressable_shards} == {
    (CFG.num_experts // 4, CFG.mlp_dim // mesh_shape[2], CFG.embed_dim)
  }


def test_compiled_train_step_contains_all_to_all():
  model, params, batch = _setup()
  tx = optax.adamw(1e-3)
  part = pt.Partitioner(pt.create_mesh(pt.MeshConfig(2, 4, 1)))

  def train_step(params, opt_state, batch, rng):
    loss, grads = _grad_fn(model)(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  with part.context():
    p_sh = part.shardings(model.params_logical_axes())
    opt_abstract = jax.eval_shape(tx.init, params)
    o_sh = part.shardings(pt.state_logical_axes(opt_abstract, params, model.params_logical_axes()))
    step = jax.jit(
      train_step,
      in_shardings=(p_sh, o_sh, part.batch_sharding(), None),
      out_shardings=(p_sh, o_sh, part.replicated()),
    )
    params = jax.device_put(params, p_sh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    hlo = step.lower(params, opt_state, batch, jax.random.PRNGKey(0)).compile().as_text()
    new_params, new_opt, loss = step(
      params, opt_state, jax.device_put(batch, part.batch_sharding()), jax.random.PRNGKey(0)
    )
  assert "all-to-all" in hlo
  assert np.isfinite(float(loss))
  # Optimizer moments of expert weights are expert-sharded too (no full replica per device).
  mu = new_opt[0].mu["layers_1"]["moe"]["wi"]
  assert {s.data.shape for s in mu.addressable_shards} == {(2, CFG.embed_dim, CFG.mlp_dim)}


def test_state_axes_follow_adafactor_factored_statistics():
  params = {"moe": {"wi": jnp.zeros((4, 256, 512))}, "norm": jnp.zeros((256,))}
  axes = {
    "moe": {"wi": jax.sharding.PartitionSpec("expert", "embed", "mlp")},
    "norm": jax.sharding.PartitionSpec("embed"),
  }
  state = jax.eval_shape(optax.adafactor(1e-3).init, params)
  specs = pt.state_logical_axes(state, params, axes)
  flat = {
    jax.tree_util.keystr(p): s
    for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]
  }
  shapes = {
    jax.tree_util.keystr(p): l.shape for p, l in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  row = next(k for k in flat if "v_row" in k and "wi" in k)
  col = next(k for k in flat if "v_col" in k and "wi" in k)
  assert shapes[row] == (4, 256) and tuple(flat[row]) == ("expert", "embed")
  assert shapes[col] == (4, 512) and tuple(flat[col]) == ("expert", "mlp")


def test_mesh_and_config_errors_are_clear():
  with pytest.raises(ValueError, match="product is 8"):
    pt.create_mesh(pt.MeshConfig(data=2, expert=2, model=1))
  mesh = pt.create_mesh(pt.MeshConfig(data=1, expert=8, model=1))
  bad = ModelConfig(num_experts=12, top_k=2)
  with pytest.raises(ValueError, match="num_experts=12 is not divisible by the expert mesh axis"):
    pt.validate_model_for_mesh(bad, mesh)
  with pytest.raises(ValueError, match="not divisible by data x expert"):
    pt.validate_batch_for_mesh(12, mesh)
