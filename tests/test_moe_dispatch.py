"""The "sort" and "ragged" dispatches against the "einsum" reference, on 1 and 8 (fake) devices."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.layers.moe import MoeLayer
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

TOL = dict(rtol=1e-6, atol=1e-6)
CFG = ModelConfig(
  vocab_size=64,
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_experts=8,
  group_size=16,
)
DROPS, NO_DROPS = 0.5, 4.0  # train capacity factors: 0.5 drops assignments, 4.0 = 2 x group


def _batch():
  toks = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 1, CFG.vocab_size)
  targets = jnp.roll(toks, -1, axis=1).at[2:5, 11:].set(0)  # padding: not routed, not counted
  return {"decoder_input_tokens": toks, "decoder_target_tokens": targets}


@functools.lru_cache(maxsize=None)
def _init(cfg: ModelConfig):
  """Params do not depend on the dispatch or capacity: initialise once per layout (compiling
  the init costs more than the step)."""
  return nn.unbox(jax.jit(LanguageModel(cfg).init)(jax.random.PRNGKey(0)))


def _run(cfg: ModelConfig, mesh_shape=None, with_hlo=False):
  """Train-mode logits, loss metrics (incl. per-layer MoE stats) and grads of the tiny model."""
  model = LanguageModel(cfg)
  params = _init(dataclasses.replace(cfg, moe_dispatch="einsum", train_capacity_factor=1.0))
  batch = _batch()

  def fn(p, b):
    def loss_fn(p):
      logits, inter, _ = model.apply(p, b, train=True)
      loss, metrics = model.loss_from_logits(logits, inter, b)
      return loss, (logits, metrics)

    (_, (logits, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    return logits, metrics, grads

  if mesh_shape is None:
    one = jax.devices()[0]
    out = jax.jit(fn)(jax.device_put(params, one), jax.device_put(batch, one))
    return jax.tree.map(np.asarray, out), None
  part = pt.Partitioner(pt.create_mesh(pt.MeshConfig(*mesh_shape)))
  with part.context():
    shardings = part.shardings(model.params_logical_axes())
    compiled = (
      jax.jit(fn, in_shardings=(shardings, part.batch_sharding())).lower(params, batch).compile()
    )
    out = compiled(jax.device_put(params, shardings), jax.device_put(batch, part.batch_sharding()))
  return jax.tree.map(np.asarray, out), compiled.as_text() if with_hlo else None


def _assert_same(got, want, tol=TOL):
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **tol)


@pytest.mark.parametrize("mesh_shape", [None, "8dev"], ids=["1dev", "8dev"])
@pytest.mark.parametrize(
  "scan,factor", [(False, DROPS), (True, NO_DROPS)], ids=["unscanned-drops", "scanned-nodrops"]
)
def test_sort_and_ragged_equal_einsum(mesh_shape, scan, factor):
  # 8 devices: expert axis 4 with data 2, or (scanned case) with the mlp split over model 2.
  if mesh_shape:
    mesh_shape = (2, 4, 1) if factor == DROPS else (1, 4, 2)
  cfg = dataclasses.replace(CFG, scan_layers=scan, train_capacity_factor=factor, gated_mlp=scan)
  ref, _ = _run(cfg, mesh_shape)
  dropped = ref[1]["moe"]["dropped_fraction"]
  assert (dropped > 0).all() if factor == DROPS else (dropped == 0).all()
  got, hlo = _run(dataclasses.replace(cfg, moe_dispatch="sort"), mesh_shape, with_hlo=True)
  _assert_same(got, ref)  # logits, aux/z losses, dropped fraction, tokens per expert, grads
  if mesh_shape:
    assert "all-to-all" in hlo

  ragged, hlo = _run(dataclasses.replace(cfg, moe_dispatch="ragged"), mesh_shape, with_hlo=True)
  assert (ragged[1]["moe"]["dropped_fraction"] == 0).all()  # also where einsum drops
  if mesh_shape:
    assert "all-to-all" in hlo
  if factor == NO_DROPS:
    _assert_same(ragged, ref, dict(rtol=1e-5, atol=1e-6))


@functools.lru_cache(maxsize=None)
def _layer_init(gated, shape):
  layer = MoeLayer(num_experts=4, mlp_dim=16, top_k=2, group_size=16, gated=gated)
  return jax.jit(layer.init)(jax.random.PRNGKey(1), jnp.ones(shape))


def _layer_run(dispatch, factor, batch_prioritized=False, gated=False):
  layer = MoeLayer(
    num_experts=4,
    mlp_dim=16,
    top_k=2,
    group_size=16,
    eval_capacity_factor=factor,
    gated=gated,
    dispatch=dispatch,
    batch_prioritized=batch_prioritized,
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 8))
  mask = jnp.asarray(np.arange(48).reshape(2, 24) < 40)
  variables = _layer_init(gated, x.shape)

  def fn(p, x):
    y, state = layer.apply({"params": p}, x, mask, mutable=["intermediates"])
    stats = {name: value[0] for name, value in state["intermediates"].items()}
    return jnp.sum(jnp.sin(y)) + stats["aux_loss"] + stats["z_loss"], (y, stats)

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
    nn.unbox(variables["params"]), x
  )
  return variables, jax.tree.map(np.asarray, (y, stats, grads))


@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_layer_sort_equals_einsum_with_priorities(batch_prioritized):
  _, ref = _layer_run("einsum", 0.5, batch_prioritized, gated=True)
  _, got = _layer_run("sort", 0.5, batch_prioritized, gated=True)
  assert ref[1]["dropped_fraction"] > 0.2
  _assert_same(got, ref)


def test_batch_prioritized_routing_changes_who_is_dropped():
  _, plain = _layer_run("einsum", 0.5)
  _, prioritized = _layer_run("einsum", 0.5, batch_prioritized=True)
  np.testing.assert_allclose(plain[1]["dropped_fraction"], prioritized[1]["dropped_fraction"])
  assert not np.allclose(plain[0], prioritized[0])


def test_ragged_ignores_capacity():
  _, ragged = _layer_run("ragged", 0.5, gated=True)
  _, roomy = _layer_run("einsum", 4.0, gated=True)
  assert ragged[1]["dropped_fraction"] == 0 and roomy[1]["dropped_fraction"] == 0
  _assert_same(ragged, roomy, dict(rtol=1e-5, atol=1e-6))


def test_params_identical_across_dispatches():
  x = jnp.ones((2, 16, 8))
  inits = {}
  for dispatch in ("einsum", "sort", "ragged"):
    layer = MoeLayer(num_experts=4, mlp_dim=16, group_size=16, gated=True, dispatch=dispatch)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(1), x)["params"]
    inits[dispatch] = (
      nn.get_partition_spec(params),
      jax.tree.map(lambda v: (v.shape, v.dtype), nn.unbox(params)),
    )
  ref_axes, ref_shapes = inits["einsum"]
  assert tuple(ref_axes["wi_gate"]) == ("expert", "embed", "mlp")
  assert tuple(ref_axes["router"]["kernel"]) == ("embed", "expert")
  for axes, shapes in inits.values():
    assert axes == ref_axes and shapes == ref_shapes


def test_bad_dispatch_is_a_config_error():
  with pytest.raises(ValueError, match="moe_dispatch"):
    ModelConfig(moe_dispatch="dense")
