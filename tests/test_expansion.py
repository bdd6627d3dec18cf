"""Expert-expansion surgery: params, router, optimizer state, validation, idempotency, sharding."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax import param_tree
from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import opt_state_expansion
from lifelong_moe_jax.lifelong import phase_expansion
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord, PhaseRecordError
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

E, N, D, H, L = 4, 3, 10, 12, 3


def _synthetic(scanned: bool, num_experts: int = E, seed: int = 0):
  """Param/axes trees shaped like the decoder's (two MoE layers unscanned, L blocks scanned)."""
  rng = np.random.default_rng(seed)
  arr = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731

  def moe(lead):
    pre = (L,) if lead else ()
    ax = ("layers",) if lead else ()
    params = {
      "wi": arr(*pre, num_experts, D, H),
      "wo": arr(*pre, num_experts, H, D),
      "router": {"kernel": arr(*pre, D, num_experts)},
    }
    axes = {
      "wi": P(*ax, "expert", "embed", "mlp"),
      "wo": P(*ax, "expert", "mlp", "embed"),
      "router": {"kernel": P(*ax, "embed", "expert")},
    }
    return params, axes

  if scanned:
    m, ma = moe(True)
    params = {
      "blocks": {
        "layer_0": {"mlp": {"wi": arr(L, D, H)}},
        "layer_1": {"moe": m, "norm": {"scale": arr(L, D)}},
      },
      "embed": {"embedding": arr(10, D)},
    }
    axes = {
      "blocks": {
        "layer_0": {"mlp": {"wi": P("layers", "embed", "mlp")}},
        "layer_1": {"moe": ma, "norm": {"scale": P("layers", "embed")}},
      },
      "embed": {"embedding": P("vocab", "embed")},
    }
  else:
    m1, a1 = moe(False)
    m3, a3 = moe(False)
    params = {
      "layers_0": {"mlp": {"wi": arr(D, H)}},
      "layers_1": {"moe": m1},
      "layers_2": {"mlp": {"wi": arr(D, H)}},
      "layers_3": {"moe": m3},
      "embed": {"embedding": arr(10, D)},
    }
    axes = {
      "layers_0": {"mlp": {"wi": P("embed", "mlp")}},
      "layers_1": {"moe": a1},
      "layers_2": {"mlp": {"wi": P("embed", "mlp")}},
      "layers_3": {"moe": a3},
      "embed": {"embedding": P("vocab", "embed")},
    }
  return params, axes


def _moe_leaves(params, scanned):
  """[(wi, wo, router kernel)] per MoE layer, expert axis first; router as [E, D]."""
  if scanned:
    m = params["blocks"]["layer_1"]["moe"]
    return [
      (np.asarray(m["wi"][b]), np.asarray(m["wo"][b]), np.asarray(m["router"]["kernel"][b]).T)
      for b in range(L)
    ]
  return [
    (
      np.asarray(params[k]["moe"]["wi"]),
      np.asarray(params[k]["moe"]["wo"]),
      np.asarray(params[k]["moe"]["router"]["kernel"]).T,
    )
    for k in ("layers_1", "layers_3")
  ]


@pytest.mark.parametrize("scanned", [False, True])
def test_copy_init_round_robin_keeps_old_slices_and_copies_with_scaled_noise(scanned):
  params, axes = _synthetic(scanned)
  new = expansion.expand_params(
    params, axes, N, init="copy", rng=jax.random.PRNGKey(0), noise_scale=0.1
  )
  phase_expansion.validate_expansion(params, new, axes, N)
  assert param_tree.expert_counts(new, axes) == {
    k: E + N for k in param_tree.expert_counts(params, axes)
  }
  # Non-expert params are the very same objects.
  assert new["embed"]["embedding"] is params["embed"]["embedding"]
  for old_layer, new_layer in zip(_moe_leaves(params, scanned), _moe_leaves(new, scanned)):
    for old, grown in zip(old_layer, new_layer):
      assert grown.shape[0] == E + N
      np.testing.assert_array_equal(grown[:E].view(np.uint32), old.view(np.uint32))
      for i in range(N):
        src = old[i % E]
        delta = grown[E + i] - src
        assert 0 < np.std(delta) < 0.3 * np.std(src)  # noise ~ 0.1 * std(source slice)
  exact = expansion.expand_params(params, axes, N, rng=jax.random.PRNGKey(0), noise_scale=0.0)
  for old_layer, new_layer in zip(_moe_leaves(params, scanned), _moe_leaves(exact, scanned)):
    for old, grown in zip(old_layer, new_layer):
      np.testing.assert_array_equal(grown[E:], old[np.arange(N) % E])


@pytest.mark.parametrize("scanned", [False, True])
def test_copy_init_by_usage_copies_each_layers_most_used_experts(scanned):
  params, axes = _synthetic(scanned)
  layers = L if scanned else 2
  usage = np.random.default_rng(1).random((layers, E))
  sources = expansion.select_source_experts(usage, N)
  assert sources.shape == (layers, N)
  np.testing.assert_array_equal(sources[:, 0], np.argmax(usage, axis=1))
  new = expansion.expand_params(
    params, axes, N, rng=jax.random.PRNGKey(0), noise_scale=0.0, source_experts=usage
  )
  for m, (old_layer, new_layer) in enumerate(
    zip(_moe_leaves(params, scanned), _moe_leaves(new, scanned))
  ):
    for old, grown in zip(old_layer, new_layer):  # wi, wo and the router column: same source.
      np.testing.assert_array_equal(grown[E:], old[sources[m]])
  with pytest.raises(expansion.ExpansionError, match="rows"):
    expansion.expand_params(
      params, axes, N, rng=jax.random.PRNGKey(0), source_experts=np.ones((layers + 1, E))
    )


def test_select_source_experts_ranks_by_usage_round_robin():
  np.testing.assert_array_equal(
    expansion.select_source_experts([1.0, 5.0, 3.0, 5.0], 6), [1, 3, 2, 0, 1, 3]
  )


@pytest.mark.parametrize("scanned", [False, True])
def test_random_init_takes_new_slices_from_the_fresh_model(scanned):
  params, axes = _synthetic(scanned)
  fresh, _ = _synthetic(scanned, num_experts=E + N, seed=7)
  calls = []

  def init_fn(rng):
    calls.append(rng)
    return jax.tree_util.tree_map(jnp.asarray, fresh)

  new = expansion.expand_params(
    params, axes, N, init="random", rng=jax.random.PRNGKey(3), model_for_random_init=init_fn
  )
  phase_expansion.validate_expansion(params, new, axes, N)
  for old_layer, fresh_layer, new_layer in zip(
    _moe_leaves(params, scanned), _moe_leaves(fresh, scanned), _moe_leaves(new, scanned)
  ):
    for old, f, grown in zip(old_layer, fresh_layer, new_layer):
      np.testing.assert_array_equal(grown[:E], old)
      np.testing.assert_array_equal(grown[E:], f[E:])
  assert calls
  with pytest.raises(expansion.ExpansionError, match="model_for_random_init"):
    expansion.expand_params(params, axes, N, init="random", rng=jax.random.PRNGKey(3))


_TINY = ModelConfig(
  vocab_size=32,
  embed_dim=16,
  num_layers=4,
  num_heads=2,
  head_dim=8,
  mlp_dim=16,
  num_experts=2,
  group_size=32,
  top_k=2,
)


def _real_params(model, seed=0):
  """Random params with the model's exact tree, shapes and logical axes (no init compile)."""
  abstract = model.abstract_params()
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
    lambda a: rng.standard_normal(a.shape).astype(a.dtype), nn.unbox(abstract)
  )
  return params, nn.get_partition_spec(abstract)


@pytest.mark.parametrize("scanned", [False, True])
def test_real_model_trees_expand_expert_weights_and_router_only(scanned):
  model = LanguageModel(dataclasses.replace(_TINY, scan_layers=scanned))
  params, axes = _real_params(model)
  new = expansion.expand_params(params, axes, 2, rng=jax.random.PRNGKey(1))
  phase_expansion.validate_expansion(params, new, axes, 2)
  counts = param_tree.expert_counts(new, axes)
  if scanned:
    assert sorted(counts) == [
      "blocks/layer_1/moe/router/kernel",
      "blocks/layer_1/moe/wi",
      "blocks/layer_1/moe/wo",
    ]
    assert new["blocks"]["layer_1"]["moe"]["wi"].shape == (2, 4, 16, 16)
  else:
    assert sorted(counts) == [
      f"layers_{i}/moe/{n}" for i in (1, 3) for n in ("router/kernel", "wi", "wo")
    ]
    assert new["layers_3"]["moe"]["router"]["kernel"].shape == (16, 4)
  assert set(counts.values()) == {4}
  big = LanguageModel(expansion.expanded_config(model.config, 2))
  want = nn.unbox(big.abstract_params())
  assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(new)
  assert all(
    a.shape == b.shape
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(new))
  )


def test_random_init_uses_the_expanded_models_own_initializer():
  model = LanguageModel(dataclasses.replace(_TINY, scan_layers=True))
  params, axes = _real_params(model)
  big = LanguageModel(expansion.expanded_config(model.config, 2))
  with pytest.raises(expansion.ExpansionError, match="must be the expanded model"):
    expansion.expand_params(
      params, axes, 2, init="random", rng=jax.random.PRNGKey(2), model_for_random_init=model
    )
  new = expansion.expand_params(
    params, axes, 2, init="random", rng=jax.random.PRNGKey(2), model_for_random_init=big
  )
  phase_expansion.validate_expansion(params, new, axes, 2)
  moe = new["blocks"]["layer_1"]["moe"]
  # New slices follow the layers' fan-in initializer (std ~ 1/sqrt(16)), unlike the N(0, 1) ones.
  for leaf, expert_ax in ((moe["wi"], 1), (moe["wo"], 1), (moe["router"]["kernel"], 2)):
    fresh = np.take(np.asarray(leaf), [2, 3], axis=expert_ax)
    assert 0.5 / 4 < np.std(fresh) < 2 / 4


def _trained_state(tx, params, seed=0):
  """``tx.init(params)`` with every float statistic replaced by positive random values."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
      return x
    return jnp.asarray(np.abs(rng.standard_normal(x.shape)).astype(x.dtype) + 0.1)

  return jax.tree_util.tree_map(fill, tx.init(params))


_OPTIMIZERS = {
  "adamw": lambda: optax.adamw(1e-3, weight_decay=0.1),
  "adafactor_factored": lambda: optax.adafactor(1e-3, min_dim_size_to_factor=8),
  "adafactor_unfactored": lambda: optax.adafactor(1e-3),
  "sgd_momentum": lambda: optax.sgd(1e-3, momentum=0.9),
}


@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("opt", sorted(_OPTIMIZERS))
def test_opt_state_expansion_matches_tx_init_of_expanded_params(opt, scanned):
  tx = _OPTIMIZERS[opt]()
  params, axes = _synthetic(scanned)
  state = _trained_state(tx, params)
  new_state = opt_state_expansion.expand_opt_state(state, params, axes, N, tx=tx)
  ref = jax.eval_shape(tx.init, expansion.expanded_abstract_params(params, axes, N))
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(ref)
  specs = pt.state_logical_axes(state, params, axes)
  old_flat = jax.tree_util.tree_flatten_with_path(state)[0]
  spec_flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  grown_leaves = 0
  for (path, old), new, want, spec in zip(
    old_flat, jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(ref), spec_flat
  ):
    assert new.shape == want.shape and new.dtype == want.dtype, jax.tree_util.keystr(path)
    ax = param_tree.expert_axis(spec)
    if ax is None or new.shape == np.shape(old):
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
      continue
    grown_leaves += 1
    new = np.asarray(new)
    np.testing.assert_array_equal(np.take(new, np.arange(E), axis=ax), np.asarray(old))
    assert not np.any(np.take(new, np.arange(E, E + N), axis=ax))
  assert grown_leaves > 0
  # Without tx the result is the same for these layouts.
  again = opt_state_expansion.expand_opt_state(state, params, axes, N)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(new_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adafactor_statistics_are_refactored_when_the_factored_dims_change():
  # wi [E, 16, 8] is factored over dims (2, 1); with 20 experts the two largest dims become (1, 0).
  # The router [16, 4] is not factored (4 < 8); with 20 experts it is.
  params = {
    "wi": np.random.default_rng(0).standard_normal((E, 16, 8)).astype(np.float32),
    "router": np.random.default_rng(1).standard_normal((16, E)).astype(np.float32),
  }
  axes = {"wi": P("expert", "embed", "mlp"), "router": P("embed", "expert")}
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=8)
  state = _trained_state(tx, params)
  with pytest.raises(expansion.ExpansionError, match="pass tx="):
    opt_state_expansion.expand_opt_state(state, params, axes, 16)
  new_state = opt_state_expansion.expand_opt_state(state, params, axes, 16, tx=tx)
  ref = jax.eval_shape(tx.init, expansion.expanded_abstract_params(params, axes, 16))
  for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(ref)):
    assert a.shape == b.shape
  fs, old = new_state[0], state[0]
  # Router: the full v [16, 4] is grown to [16, 20] and factored over (embed, expert):
  # v_col [20] = mean over embed (old experts exact, new zero), v_row [16] = mean over experts.
  assert fs.v_row["router"].shape == (16,) and fs.v_col["router"].shape == (20,)
  grown_v = np.pad(np.asarray(old.v["router"]), [(0, 0), (0, 16)])
  np.testing.assert_allclose(np.asarray(fs.v_col["router"]), grown_v.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(fs.v_row["router"]), grown_v.mean(axis=1), rtol=1e-6)
  assert not np.any(np.asarray(fs.v_col["router"][E:]))
  # wi: the full estimate V = v_row * v_col / mean(v_row) of the old layout (dims (2, 1)) is
  # grown and re-factored over dims (1, 0).
  row, col = np.asarray(old.v_row["wi"]), np.asarray(old.v_col["wi"])  # [E, 8], [E, 16]
  full = np.expand_dims(row / row.mean(axis=1, keepdims=True), 1) * np.expand_dims(col, 2)
  full = np.pad(full, [(0, 16), (0, 0), (0, 0)])  # [20, 16, 8]
  np.testing.assert_allclose(np.asarray(fs.v_row["wi"]), full.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fs.v_col["wi"]), full.mean(axis=1), rtol=1e-5)
  assert not np.any(np.asarray(fs.v_col["wi"][E:]))


def test_validate_expansion_reports_tampering():
  params, axes = _synthetic(False)
  new = expansion.expand_params(params, axes, N, rng=jax.random.PRNGKey(0))
  bad = jax.tree_util.tree_map(lambda x: x, new)
  bad["layers_3"]["moe"]["wo"] = new["layers_3"]["moe"]["wo"].at[1, 0, 0].add(1e-6)
  with pytest.raises(expansion.ExpansionError, match="layers_3/moe/wo.*bit-identical"):
    phase_expansion.validate_expansion(params, bad, axes, N)
  bad = dict(new, embed={"embedding": params["embed"]["embedding"] + 1})
  with pytest.raises(expansion.ExpansionError, match="non-expert param changed value"):
    phase_expansion.validate_expansion(params, bad, axes, N)
  with pytest.raises(expansion.ExpansionError, match="expected shape"):
    phase_expansion.validate_expansion(params, new, axes, N + 1)


def test_bad_arguments_have_clear_errors():
  params, axes = _synthetic(False)
  with pytest.raises(TypeError, match="unbox"):
    boxed = jax.tree_util.tree_map(lambda x, s: nn.LogicallyPartitioned(x, tuple(s)), params, axes)
    expansion.expand_params(boxed, axes, 1, rng=jax.random.PRNGKey(0))
  with pytest.raises(expansion.ExpansionError, match="init must be"):
    expansion.expand_params(params, axes, 1, init="zeros", rng=jax.random.PRNGKey(0))
  dense_axes = jax.tree_util.tree_map(
    lambda s: P(*[None if a == "expert" else a for a in s]),
    axes,
    is_leaf=lambda x: isinstance(x, P),
  )
  with pytest.raises(expansion.ExpansionError, match="No parameter has a logical 'expert' axis"):
    expansion.expand_params(params, dense_axes, 1, rng=jax.random.PRNGKey(0))
  assert expansion.expand_params(params, axes, 0, rng=jax.random.PRNGKey(0)) is params
  with pytest.raises(expansion.ExpansionError, match="dense"):
    expansion.expanded_config(ModelConfig(num_experts=0), 2)


def test_phase_record_roundtrip_slices_and_validation(tmp_path):
  record = PhaseRecord.start("A", mixture="wiki_en", steps=10, method="lifelong_moe", num_experts=4)
  record = record.append_phase(
    "B",
    mixture="code_py",
    steps=20,
    method="lifelong_moe",
    add_experts=2,
    init="copy",
    extra={"noise_scale": 0.01},
  )
  record = record.append_phase("C", mixture="dialog_en", steps=5, method="lifelong_moe")
  assert record.expert_slices() == {"A": (0, 4), "B": (4, 6), "C": (6, 6)}
  assert record.num_experts == 6 and record.experts_before("B") == 4
  assert record.owner_of(5) == "B" and record.phase("C").added_experts == 0
  record.save(tmp_path / "record.json")
  loaded = PhaseRecord.load(tmp_path / "record.json")
  assert loaded == record
  assert json.loads(record.to_json())["phases"][1]["extra"] == {"noise_scale": 0.01}
  record.validate_expert_counts({"layers_1/moe/wi": 6})
  with pytest.raises(PhaseRecordError, match="has 4 experts but the phase record says 6"):
    record.validate_expert_counts({"layers_1/moe/wi": 4})
  with pytest.raises(PhaseRecordError, match="Duplicate"):
    record.append_phase("B", mixture="x", steps=1, method="m")
  with pytest.raises(PhaseRecordError, match="init="):
    record.append_phase("D", mixture="x", steps=1, method="m", add_experts=1)
  data = record.to_dict()
  data["phases"][1]["expert_start"] = 3
  with pytest.raises(PhaseRecordError, match="contiguous"):
    PhaseRecord.from_dict(data)


def test_expand_for_phase_refuses_to_expand_twice():
  params, axes = _synthetic(True)
  tx = optax.adamw(1e-3)
  record = PhaseRecord.start("A", mixture="a", steps=1, method="lifelong_moe", num_experts=E)
  assert phase_expansion.expansion_needed(record, "B", params, axes)
  result = phase_expansion.expand_for_phase(
    params,
    axes,
    record,
    phase_name="B",
    mixture="b",
    steps=1,
    method="lifelong_moe",
    add_experts=N,
    init="copy",
    rng=jax.random.PRNGKey(0),
    opt_state=tx.init(params),
    tx=tx,
    source_experts=np.ones((L, E)),
  )
  assert result.record.expert_slices() == {"A": (0, E), "B": (E, E + N)}
  assert result.record.phase("B").extra["source_experts"] == [[0, 1, 2]] * L
  assert result.opt_state[0].mu["blocks"]["layer_1"]["moe"]["wi"].shape == (L, E + N, D, H)
  # A restart finds the expanded checkpoint and its record: no second expansion.
  assert not phase_expansion.expansion_needed(result.record, "B", result.params, axes)
  with pytest.raises(phase_expansion.AlreadyExpandedError, match="already expanded for phase 'B'"):
    phase_expansion.check_not_already_expanded(result.record, "B", result.params, axes)
  with pytest.raises(phase_expansion.AlreadyExpandedError):
    phase_expansion.expand_for_phase(
      result.params,
      axes,
      result.record,
      phase_name="B",
      mixture="b",
      steps=1,
      method="lifelong_moe",
      add_experts=N,
      init="copy",
      rng=jax.random.PRNGKey(0),
    )
  # Expanded params saved without their record (or the reverse) are detected.
  with pytest.raises(expansion.ExpansionError, match="disagree"):
    phase_expansion.check_not_already_expanded(record, "B", result.params, axes)
  with pytest.raises(expansion.ExpansionError, match="record says phase 'B' has"):
    phase_expansion.check_not_already_expanded(result.record, "B", params, axes)


def test_sharded_expansion_keeps_expert_sharding_without_gathering():
  assert jax.device_count() == 8
  params, axes = _synthetic(True)
  part = pt.Partitioner(pt.create_mesh(pt.MeshConfig(data=2, expert=4, model=1)))
  shardings = part.shardings(axes)
  sharded = jax.device_put(params, shardings)
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=8)
  state_shardings = part.shardings(
    pt.state_logical_axes(jax.eval_shape(tx.init, params), params, axes)
  )
  state = jax.device_put(_trained_state(tx, params), state_shardings)
  new = expansion.expand_params(sharded, axes, 4, rng=jax.random.PRNGKey(0), noise_scale=0.1)
  phase_expansion.validate_expansion(sharded, new, axes, 4)
  moe, old_moe = new["blocks"]["layer_1"]["moe"], params["blocks"]["layer_1"]["moe"]
  wi, router = moe["wi"], moe["router"]["kernel"]
  assert wi.shape == (L, 8, D, H)
  assert wi.sharding.spec == shardings["blocks"]["layer_1"]["moe"]["wi"].spec
  assert {s.data.shape for s in wi.addressable_shards} == {(L, 2, D, H)}
  assert {s.data.shape for s in router.addressable_shards} == {(L, D, 2)}
  for i in range(4):  # round-robin copies plus noise of ~0.1 * std(source).
    delta = np.asarray(wi[:, E + i]) - old_moe["wi"][:, i]
    assert 0 < np.std(delta) < 0.3 * np.std(old_moe["wi"][:, i])
  new_state = opt_state_expansion.expand_opt_state(state, params, axes, 4, tx=tx)
  v_row = new_state[0].v_row["blocks"]["layer_1"]["moe"]["wi"]  # [L, 8, D]: mlp factored out.
  assert v_row.shape == (L, 8, D)
  assert {s.data.shape for s in v_row.addressable_shards} == {(L, 2, D)}
  np.testing.assert_array_equal(
    np.asarray(v_row[:, :E]), np.asarray(state[0].v_row["blocks"]["layer_1"]["moe"]["wi"])
  )
  with pytest.raises(expansion.ExpansionError, match="not divisible by mesh axes"):
    expansion.expand_params(sharded, axes, 2, rng=jax.random.PRNGKey(0))
