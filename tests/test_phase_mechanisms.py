"""Phase-start mechanisms of issue 11 (``MethodOptions``): router columns of new experts, optimizer
state of new slices, per-phase learning-rate warmup, router-level distillation, new-expert load
balance. Exact values on small trees."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import methods
from lifelong_moe_jax.lifelong import new_expert_balance
from lifelong_moe_jax.lifelong import opt_state_expansion
from lifelong_moe_jax.lifelong import phase_expansion
from lifelong_moe_jax.lifelong.distill import Distillation, router_distillation_loss
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.models import router_probe
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel, collect_moe_stats
from lifelong_moe_jax.training import losses
from lifelong_moe_jax.training import optimizers

E, N, D, H = 2, 2, 3, 4


def _tree(scanned=False, seed=0, D=D, H=H):  # pylint: disable=invalid-name,redefined-outer-name
  """Two MoE layers (unscanned ``layers_1``/``layers_3``, or 2 scanned blocks) + a dense leaf."""
  rng = np.random.default_rng(seed)
  arr = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  if scanned:
    params = {
      "blocks": {"moe": {"wi": arr(2, E, D, H), "router": {"kernel": arr(2, D, E)}}},
      "dense": arr(D, H),
    }
    axes = {
      "blocks": {
        "moe": {
          "wi": P("layers", "expert", "embed", "mlp"),
          "router": {"kernel": P("layers", "embed", "expert")},
        }
      },
      "dense": P("embed", "mlp"),
    }
    return params, axes
  params = {
    f"layers_{i}": {"moe": {"wi": arr(E, D, H), "router": {"kernel": arr(D, E)}}} for i in (1, 3)
  }
  params["dense"] = arr(D, H)
  axes = {
    f"layers_{i}": {
      "moe": {"wi": P("expert", "embed", "mlp"), "router": {"kernel": P("embed", "expert")}}
    }
    for i in (1, 3)
  }
  axes["dense"] = P("embed", "mlp")
  return params, axes


def _routers(params, scanned):
  """Router kernels [D, E] per MoE layer."""
  if scanned:
    k = np.asarray(params["blocks"]["moe"]["router"]["kernel"])
    return [k[0], k[1]]
  return [np.asarray(params[f"layers_{i}"]["moe"]["router"]["kernel"]) for i in (1, 3)]


def _wis(params, scanned):
  if scanned:
    return np.asarray(params["blocks"]["moe"]["wi"])
  return np.stack([np.asarray(params[f"layers_{i}"]["moe"]["wi"]) for i in (1, 3)])


# ------------------------------------------------------------------------------- router columns
@pytest.mark.parametrize("scanned", [False, True])
def test_router_init_options_give_exact_new_columns(scanned):
  params, axes = _tree(scanned)
  key = jax.random.PRNGKey(0)
  mu = np.array([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], np.float32)  # |mu|^2 = 9 and 25
  shift = np.array([[0.5, -1.0, 2.0], [-3.0, 0.25, 1.0]], np.float32)  # copy_contrast, per layer
  default = expansion.expand_params(params, axes, N, rng=key, noise_scale=0.01)
  same = expansion.expand_params(
    params, axes, N, rng=key, noise_scale=0.01, router_init="copy", router_input_mean=mu
  )
  for a, b in zip(jax.tree_util.tree_leaves(default), jax.tree_util.tree_leaves(same)):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # "copy" is today's surgery, bit for bit
  exact = {
    name: expansion.expand_params(
      params,
      axes,
      N,
      rng=key,
      noise_scale=0.0,
      router_init=name,
      router_offset=1.5,
      router_input_mean=mu,
      router_column_shift=shift,
    )
    for name in expansion.ROUTER_INITS
  }
  for layer, old in enumerate(_routers(params, scanned)):
    copy = _routers(exact["copy"], scanned)[layer]
    np.testing.assert_array_equal(copy[:, :E], old)
    np.testing.assert_array_equal(copy[:, E:], old[:, [0, 1]])  # round-robin sources
    offset = _routers(exact["copy_offset"], scanned)[layer]
    np.testing.assert_array_equal(offset[:, :E], old)
    np.testing.assert_allclose(
      offset[:, E:], old - 1.5 * mu[layer][:, None] / (mu[layer] @ mu[layer]), rtol=1e-6
    )
    # On inputs with mean mu, the new logits are on average exactly 1.5 below the source's.
    np.testing.assert_allclose(mu[layer] @ offset[:, E:], mu[layer] @ old - 1.5, rtol=1e-5)
    contrast = _routers(exact["copy_contrast"], scanned)[layer]
    np.testing.assert_array_equal(contrast[:, :E], old)
    np.testing.assert_allclose(contrast[:, E:], old[:, [0, 1]] + shift[layer][:, None], rtol=1e-6)
    zero = _routers(exact["zero"], scanned)[layer]
    np.testing.assert_array_equal(zero[:, :E], old)
    assert not zero[:, E:].any()
    assert not _routers(exact["small_random"], scanned)[layer][:, E:].any()  # scale 0
  # Expert weights do not depend on the router option.
  for name in expansion.ROUTER_INITS:
    np.testing.assert_array_equal(_wis(exact[name], scanned), _wis(exact["copy"], scanned))
  small = expansion.expand_params(
    params, axes, N, rng=key, noise_scale=0.01, router_init="small_random"
  )
  np.testing.assert_array_equal(_wis(small, scanned), _wis(default, scanned))
  for layer, old in enumerate(_routers(params, scanned)):
    new = _routers(small, scanned)[layer][:, E:]
    assert 0 < np.abs(new).max() < 0.1 * old.std()


def test_router_init_errors_and_real_router_leaves():
  params, axes = _tree()
  key = jax.random.PRNGKey(0)
  with pytest.raises(expansion.ExpansionError, match="router_input_mean"):
    expansion.expand_params(params, axes, N, rng=key, router_init="copy_offset")
  with pytest.raises(expansion.ExpansionError, match="init='copy'"):
    expansion.expand_params(
      params,
      axes,
      N,
      rng=key,
      init="random",
      router_init="copy_offset",
      router_input_mean=np.ones(D),
    )
  with pytest.raises(expansion.ExpansionError, match="router_init must be"):
    expansion.expand_params(params, axes, N, rng=key, router_init="bias")
  with pytest.raises(expansion.ExpansionError, match="zero"):
    expansion.expand_params(
      params, axes, N, rng=key, router_init="copy_offset", router_input_mean=np.zeros(D)
    )
  # In the real model, exactly the router kernels are router leaves (by logical axes).
  model = LanguageModel(
    ModelConfig(
      vocab_size=32,
      embed_dim=16,
      num_layers=4,
      num_heads=2,
      head_dim=8,
      mlp_dim=16,
      num_experts=2,
      gated_mlp=True,
    )
  )
  _, infos = expansion.flatten_with_axes(
    nn.unbox(model.abstract_params()), model.params_logical_axes()
  )
  routers = sorted(i.key for i in infos if expansion.is_router_leaf(i))
  assert routers == ["layers_1/moe/router/kernel", "layers_3/moe/router/kernel"]
  # Random init with zero columns: the new router columns are zero, the experts are fresh.
  fresh = expansion.expand_params(
    nn.unbox(model.init(jax.random.PRNGKey(0))),
    model.params_logical_axes(),
    2,
    init="random",
    rng=key,
    model_for_random_init=LanguageModel(expansion.expanded_config(model.config, 2)),
    router_init="zero",
  )
  assert not np.asarray(fresh["layers_1"]["moe"]["router"]["kernel"])[:, 2:].any()


# ------------------------------------------------------------------------------- optimizer state
def _adafactor(momentum=None):
  """The project's Adafactor (training/optimizers.py), constant LR, factoring small dims too."""
  return optimizers.create_optimizer(
    name="adafactor",
    schedule=optax.constant_schedule(0.1),
    clip_grad_norm=1.0,
    adafactor_min_dim_size_to_factor=3,
    adafactor_momentum=momentum,
  ).tx


def _train(tx, params, steps=3, seed=1):
  rng = np.random.default_rng(seed)
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.tree_util.tree_map(
      lambda p: rng.standard_normal(p.shape).astype(np.float32), params
    )
    _, state = tx.update(grads, state, params)
  return state


def _source_grads(params, axes, sources, seed=2):
  """Random grads whose new slices equal their source slices (per MoE layer)."""
  rng = np.random.default_rng(seed)
  _, infos = expansion.flatten_with_axes(params, axes)
  leaves = []
  for info in infos:
    g = rng.standard_normal(np.shape(info.value)).astype(np.float32)
    if info.expert_axis is not None:
      old = np.take(g, np.arange(E), axis=info.expert_axis)
      g = np.concatenate([old, np.take(old, sources, axis=info.expert_axis)], info.expert_axis)
    leaves.append(g)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


def _slice_rms(update, axis, index):
  return float(np.sqrt(np.mean(np.take(np.asarray(update), index, axis=axis) ** 2)))


@pytest.mark.parametrize("scanned,momentum", [(False, None), (True, 0.9)])
def test_first_update_of_a_new_slice_matches_its_source_with_source_statistics(scanned, momentum):
  tx = _adafactor(momentum)
  params, axes = _tree(scanned)
  state = _train(tx, params)
  new_params = expansion.expand_params(params, axes, N, rng=jax.random.PRNGKey(0), noise_scale=0.0)
  sources = expansion.source_indices("round_robin", E, N)
  grads = _source_grads(new_params, axes, sources)
  results = {}
  for mode in expansion.NEW_SLICE_STATES:
    new_state = opt_state_expansion.expand_opt_state(
      state, params, axes, N, tx=tx, new_slices=mode, source_experts=sources
    )
    ref = jax.eval_shape(tx.init, new_params)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(ref)
    results[mode] = tx.update(grads, new_state, new_params)[0]
  _, infos = expansion.flatten_with_axes(new_params, axes)
  checked = 0
  for info, upd_src, upd_zero in zip(
    infos, jax.tree_util.tree_leaves(results["source"]), jax.tree_util.tree_leaves(results["zeros"])
  ):
    if info.expert_axis is None:
      continue
    ax = info.expert_axis
    for i, s in enumerate(sources):
      new_rms, src_rms = _slice_rms(upd_src, ax, E + i), _slice_rms(upd_src, ax, int(s))
      assert new_rms == pytest.approx(src_rms, rel=1e-6), info.key
      np.testing.assert_allclose(
        np.take(np.asarray(upd_src), E + i, axis=ax),
        np.take(np.asarray(upd_src), int(s), axis=ax),
        rtol=1e-5,
        atol=1e-9,
      )  # float32 rounding of the vectorised reductions
      checked += 1
      # With zero statistics the first update of a new slice is not its source's.
      assert _slice_rms(upd_zero, ax, E + i) != pytest.approx(
        _slice_rms(upd_zero, ax, int(s)), rel=1e-3
      ), info.key
  assert checked == 2 * N * (1 if scanned else 2)


def test_new_slice_statistics_are_copies_or_means_of_old_slices():
  tx = _adafactor(momentum=0.9)
  params, axes = _tree(D=5, H=6)  # wi [E, 5, 6] stays factored over (embed, mlp) when E grows to 4
  state = _train(tx, params)
  sources = np.array([1, 0])
  src = opt_state_expansion.expand_opt_state(
    state, params, axes, N, tx=tx, new_slices="source", source_experts=sources
  )
  mean = opt_state_expansion.expand_opt_state(state, params, axes, N, tx=tx, new_slices="mean")
  zeros = opt_state_expansion.expand_opt_state(state, params, axes, N, tx=tx)
  # wi [E, 5, 6] is factored over (embed, mlp): v_row [E, 5] and v_col [E, 6] keep the expert axis.
  fs_old = state[1][0]
  for name in ("v_row", "v_col"):
    old = np.asarray(fs_old.__getattribute__(name)["layers_1"]["moe"]["wi"])
    got_src = np.asarray(src[1][0].__getattribute__(name)["layers_1"]["moe"]["wi"])
    got_mean = np.asarray(mean[1][0].__getattribute__(name)["layers_1"]["moe"]["wi"])
    got_zero = np.asarray(zeros[1][0].__getattribute__(name)["layers_1"]["moe"]["wi"])
    np.testing.assert_array_equal(got_src, np.concatenate([old, old[sources]]))
    np.testing.assert_allclose(
      got_mean, np.concatenate([old, np.repeat(old.mean(0, keepdims=True), N, 0)]), rtol=1e-6
    )
    np.testing.assert_array_equal(got_zero, np.concatenate([old, np.zeros_like(old)]))
  # Momentum (optax's EmaState, full shape) and the unfactored router v follow the same rule.
  ema = lambda st: next(x for x in st[1] if hasattr(x, "ema")).ema["layers_3"]["moe"]  # noqa: E731
  old = np.asarray(ema(state)["wi"])
  np.testing.assert_array_equal(np.asarray(ema(src)["wi"]), np.concatenate([old, old[sources]]))
  np.testing.assert_allclose(
    np.asarray(ema(mean)["wi"]),
    np.concatenate([old, np.repeat(old.mean(0, keepdims=True), N, 0)]),
    rtol=1e-6,
  )
  old = np.asarray(ema(state)["router"]["kernel"])  # [5, E]
  np.testing.assert_array_equal(
    np.asarray(ema(src)["router"]["kernel"]), np.concatenate([old, old[:, sources]], 1)
  )
  with pytest.raises(expansion.ExpansionError, match="source_experts"):
    opt_state_expansion.expand_opt_state(state, params, axes, N, tx=tx, new_slices="source")
  with pytest.raises(expansion.ExpansionError, match="new_slices must be"):
    opt_state_expansion.expand_opt_state(state, params, axes, N, tx=tx, new_slices="copy")


# ------------------------------------------------------------------------------- warmup
def test_phase_warmups_rewarm_linearly_from_zero_at_every_phase_start():
  base = optax.constant_schedule(2.0)
  lr = optimizers.with_phase_warmups(base, [0, 10, 20], 4)
  want = {
    0: 2.0,
    9: 2.0,
    10: 0.0,
    11: 0.5,
    12: 1.0,
    13: 1.5,
    14: 2.0,
    19: 2.0,
    20: 0.0,
    21: 0.5,
    24: 2.0,
    100: 2.0,
  }
  for step, value in want.items():
    assert float(lr(step)) == pytest.approx(value, abs=1e-7), step
    assert float(jax.jit(lr)(jnp.int32(step))) == pytest.approx(value, abs=1e-7), step
  # Multiplies the base schedule (rsqrt with its own warmup).
  rsqrt = optimizers.learning_rate_schedule("rsqrt", peak_learning_rate=0.01, warmup_steps=5)
  lr = optimizers.with_phase_warmups(rsqrt, [20], 10)
  for step in (3, 19, 20, 23, 30, 40):
    factor = 1.0 if step < 20 else min(1.0, (step - 20) / 10)
    assert float(lr(step)) == pytest.approx(float(rsqrt(step)) * factor, rel=1e-6), step
  # A phase shorter than the warmup: the next start restarts the ramp.
  lr = optimizers.with_phase_warmups(base, [10, 12], 4)
  assert [float(lr(s)) for s in (11, 12, 13)] == pytest.approx([0.5, 0.0, 0.5])
  assert optimizers.with_phase_warmups(base, [10], 0) is base
  assert optimizers.phase_warmup_schedule([10], 0, train_steps=20) is None
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizers.with_phase_warmups(base, [10], -1)


# ------------------------------------------------------------------------------- MethodOptions
def test_method_options_defaults_validation_and_record():
  opts = methods.MethodOptions()
  d = opts.to_dict()
  assert (
    d["router_init"],
    d["router_offset"],
    d["new_slice_opt_state"],
    d["phase_warmup_steps"],
    d["router_distill_weight"],
    d["balance_new_experts_only"],
  ) == ("copy_offset", 2.0, "source", 0, 0.0, False)  # the study's choice (docs/study.md)
  bad = [
    (dict(router_init="bias"), "router_init must be one of"),
    (dict(expert_init="random"), "router_init='copy_offset' and new_slice_opt_state='source'"),
    (
      dict(router_init="copy_offset", expert_init="random", new_slice_opt_state="mean"),
      r"no source experts to copy, which router_init='copy_offset' need",
    ),
    (dict(new_slice_opt_state="copy"), "new_slice_opt_state must be one of"),
    (
      dict(new_slice_opt_state="source", expert_init="random", router_init="copy"),
      "which new_slice_opt_state='source' need",
    ),
    (dict(router_offset=-1.0), "router_offset must be >= 0"),
    (dict(phase_warmup_steps=-5), "phase_warmup_steps must be >= 0"),
    (dict(router_distill_weight=-0.1), "router_distill_weight must be >= 0"),
    (dict(balance_new_experts_only=1), "balance_new_experts_only must be True or False"),
  ]
  for kwargs, message in bad:
    with pytest.raises(methods.MethodError, match=message):
      methods.MethodOptions(**kwargs)
  ok = methods.MethodOptions(
    router_init="small_random", new_slice_opt_state="mean", expert_init="random"
  )
  assert ok.to_dict()["router_init"] == "small_random"
  # Non-default surgery options are recorded in the phase's extra; defaults add nothing.
  params, axes = _tree()
  record = PhaseRecord.start("a", mixture="m", steps=1, method="x", num_experts=E)
  kw = dict(
    phase_name="b",
    mixture="m",
    steps=1,
    method="x",
    add_experts=N,
    init="copy",
    rng=jax.random.PRNGKey(0),
  )
  plain = phase_expansion.expand_for_phase(params, axes, record, **kw).record.phases[-1].extra
  assert plain == {"noise_scale": 0.01}
  extra = (
    phase_expansion.expand_for_phase(
      params,
      axes,
      record,
      router_init="copy_offset",
      router_offset=0.5,
      router_input_mean=np.ones(D),
      new_slice_opt_state="mean",
      **kw,
    )
    .record.phases[-1]
    .extra
  )
  assert extra == {
    "noise_scale": 0.01,
    "router_init": "copy_offset",
    "router_offset": 0.5,
    "new_slice_opt_state": "mean",
  }


# ------------------------------------------------------------------------------- routing losses
CFG = ModelConfig(
  vocab_size=32,
  embed_dim=16,
  num_layers=2,
  num_heads=2,
  head_dim=8,
  mlp_dim=16,
  num_experts=2,
  top_k=2,
  group_size=8,
  max_length=16,
)


def _batch(seed=0, batch=2, length=8):
  tokens = np.random.default_rng(seed).integers(1, 32, (batch, length)).astype(np.int32)
  tokens[1, -2:] = 0  # padding
  return {"decoder_input_tokens": jnp.asarray(tokens), "decoder_target_tokens": jnp.asarray(tokens)}


@pytest.mark.parametrize("scan", [False, True])
def test_router_probe_captures_the_routers_logits_and_inputs(scan):
  cfg = dataclasses.replace(CFG, num_layers=4, scan_layers=scan, num_experts=4)
  model = LanguageModel(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  batch = _batch()
  with router_probe.capture_router(logits=True, inputs=True):
    logits, inter, _ = jax.jit(lambda p, b: model.apply(p, b))(params, batch)
  plain_logits, _, _ = jax.jit(lambda p, b: model.apply(p, b))(params, batch)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain_logits))  # routing unchanged
  stats = router_probe.collect_router_stats(inter, cfg)
  moe = collect_moe_stats(inter, cfg)
  assert stats["router_logits"].shape == (2, 2, 8, 4)  # [M, G, S, E]
  mask = np.asarray(batch["decoder_target_tokens"] > 0, np.float32).reshape(2, 8)
  np.testing.assert_allclose(np.asarray(stats["router_token_count"]), [mask.sum()] * 2)
  # The top-k choices of the captured logits give the layers' own expert_fraction.
  probs = jax.nn.softmax(stats["router_logits"], -1)
  _, index = jax.lax.top_k(probs, 2)
  counts = np.einsum("mgske,gs->me", np.asarray(jax.nn.one_hot(index, 4)), mask)
  np.testing.assert_allclose(
    counts / counts.sum(-1, keepdims=True), np.asarray(moe["expert_fraction"]), rtol=1e-6
  )


def test_router_distillation_loss_exact_value():
  teacher = np.array([[[[1.0, 0.0], [0.0, 2.0]]]], np.float32)  # [M=1, G=1, S=2, E_t=2]
  student = np.array([[[[0.0, 0.0, 9.0], [3.0, 1.0, -4.0]]]], np.float32)  # E_s = 3
  mask = np.array([[1, 1]])

  def kl(p_logits, q_logits):
    p = np.exp(p_logits) / np.exp(p_logits).sum()
    q = np.exp(q_logits) / np.exp(q_logits).sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))

  want = (
    kl(teacher[0, 0, 0], student[0, 0, 0, :2]) + kl(teacher[0, 0, 1], student[0, 0, 1, :2])
  ) / 2
  got = router_distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask))
  assert float(got) == pytest.approx(want, rel=1e-6)
  # Only real tokens count; new-expert logits and per-token shifts of the old ones do not matter.
  masked = router_distillation_loss(
    jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(np.array([[1, 0]]))
  )
  assert float(masked) == pytest.approx(kl(teacher[0, 0, 0], student[0, 0, 0, :2]), rel=1e-6)
  shifted = teacher + np.array([5.0, -1.0], np.float32)[None, None, :, None]
  same = np.concatenate([shifted, np.full((1, 1, 2, 1), 7.0, np.float32)], -1)
  assert float(
    router_distillation_loss(jnp.asarray(same), jnp.asarray(teacher), jnp.asarray(mask))
  ) == pytest.approx(0.0, abs=1e-7)


def test_router_distillation_through_the_training_loss():
  teacher_model = LanguageModel(CFG)
  teacher = nn.unbox(teacher_model.init(jax.random.PRNGKey(0)))
  student_model = LanguageModel(expansion.expanded_config(CFG, 2))
  student = expansion.expand_params(
    teacher,
    teacher_model.params_logical_axes(),
    2,
    rng=jax.random.PRNGKey(1),
    noise_scale=0.0,
    router_init="zero",
  )
  batch = _batch()
  reg = Distillation(teacher_model, teacher, weight=0.0, router_weight=2.0)
  assert reg.uses_router_logits

  def total(p, t):
    return losses.training_loss(student_model, p, batch, jax.random.PRNGKey(0), [reg], [t])

  loss, metrics = jax.jit(total)(student, teacher)
  # Same old columns and shared weights: the student's routing over the old experts is the teacher's.
  assert float(metrics["reg/distillation/router_kl"]) == pytest.approx(0.0, abs=1e-6)
  moved = jax.tree_util.tree_map(lambda x: x, student)
  moved["layers_0"]["mlp"]["wi"] = student["layers_0"]["mlp"]["wi"] * 1.5
  _, metrics = jax.jit(total)(moved, teacher)
  rkl = float(metrics["reg/distillation/router_kl"])
  assert rkl > 0
  assert float(metrics["reg/distillation/loss"]) == pytest.approx(2.0 * rkl, rel=1e-6)
  grads = jax.grad(lambda p: total(p, teacher)[0])(moved)
  assert np.abs(np.asarray(grads["layers_0"]["mlp"]["wi"])).max() > 0
  # No router weight: nothing is captured and the term is the plain logit distillation.
  plain = Distillation(teacher_model, teacher, weight=1.0)
  assert not plain.uses_router_logits
  _, m = jax.jit(
    lambda p, t: losses.training_loss(student_model, p, batch, jax.random.PRNGKey(0), [plain], [t])
  )(moved, teacher)
  assert "reg/distillation/router_kl" not in m


def test_new_expert_balance_loss_exact_value():
  # M=1, G=1, S=3 tokens, E=4 (old 0-1, new 2-3), top-1.
  logits = np.log(
    np.array([[[[0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.2, 0.6], [0.1, 0.1, 0.7, 0.1]]]], np.float32)
  )
  mask = np.array([[1, 1, 1]])
  got = new_expert_balance.new_expert_balance_loss(jnp.asarray(logits), jnp.asarray(mask), 2, 1)
  f = np.array([2, 1]) / 3  # top-1 choices: 2, 3, 2
  p = np.array([0.6 + 0.2 + 0.7, 0.2 + 0.6 + 0.1])  # new-expert probability mass, renormalised
  p = p / p.sum()
  assert float(got[0]) == pytest.approx(2 * np.sum(f * p), rel=1e-6)
  # Old-expert-only traffic contributes nothing.
  old_only = np.log(np.array([[[[0.5, 0.4, 0.05, 0.05]] * 3]], np.float32))
  assert (
    float(
      new_expert_balance.new_expert_balance_loss(jnp.asarray(old_only), jnp.asarray(mask), 2, 1)[0]
    )
    == 0.0
  )


def test_new_expert_balance_replaces_the_all_expert_balance_in_the_loss():
  cfg = expansion.expanded_config(CFG, 2)
  model = LanguageModel(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  batch = _batch()
  reg = new_expert_balance.NewExpertBalance(cfg, 2)
  loss, m = jax.jit(
    lambda p: losses.training_loss(model, p, batch, jax.random.PRNGKey(0), [reg], [{}])
  )(params)
  want = (
    m["cross_entropy"]
    + cfg.router_z_loss_weight * m["z_loss"]
    + cfg.aux_loss_weight * m["reg/new_expert_balance/new_balance"]
  )
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  assert float(m["reg/new_expert_balance/replaced_aux"]) == pytest.approx(float(m["aux_loss"]))
  with pytest.raises(ValueError, match="new experts"):
    new_expert_balance.NewExpertBalance(cfg, 4)


def test_expand_checkpoint_measures_mu_with_the_source_model_and_records_the_options(tmp_path):
  """The phase-start path: ``expand_checkpoint`` evaluates ``router_input_mean(model, params)`` on
  the restored source and passes every option to the surgery."""
  from lifelong_moe_jax import checkpoint_manager  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong import checkpoint_expansion  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import trainer as trainer_lib  # pylint: disable=import-outside-toplevel

  partitioner = partitioning.Partitioner(partitioning.create_mesh(partitioning.MeshConfig()))
  optimizer = optimizers.create_optimizer(name="adafactor")
  trainer = trainer_lib.Trainer(LanguageModel(CFG), partitioner, optimizer)
  state = trainer.init_state()
  state, _ = trainer.train_step(
    state, trainer.global_batch({k: np.tile(np.asarray(v), (4, 1)) for k, v in _batch().items()})
  )
  source = str(tmp_path / "a")
  checkpoint_manager.save_state(
    source, 1, state, {"model_config": dataclasses.asdict(CFG), "optimizer": "adafactor"}
  )
  seen = []

  def mean(model, params):
    seen.append(model.config.num_experts)
    return np.tile(np.arange(1.0, 17.0), (1, 1))  # [1, embed]: the same mu for every layer

  out = checkpoint_expansion.expand_checkpoint(
    source,
    str(tmp_path / "b"),
    source_config=CFG,
    partitioner=partitioner,
    optimizer=optimizer,
    add_experts=2,
    phase_name="b",
    mixture="m",
    steps=1,
    method="lifelong_moe",
    rng=jax.random.PRNGKey(0),
    noise_scale=0.0,
    router_init="copy_offset",
    router_offset=2.0,
    router_input_mean=mean,
    new_slice_opt_state="source",
  )
  assert seen == [CFG.num_experts]
  assert out.record.phases[-1].extra == {
    "noise_scale": 0.0,
    "router_init": "copy_offset",
    "router_offset": 2.0,
    "new_slice_opt_state": "source",
  }
  big = expansion.expanded_config(CFG, 2)
  restored = jax.device_get(
    checkpoints.restore_tree(
      out.step_dir, trainer_lib.Trainer(LanguageModel(big), partitioner, optimizer).abstract_state
    )
  )
  kernel = np.asarray(restored.params["layers_1"]["moe"]["router"]["kernel"])
  mu = np.arange(1.0, 17.0)
  np.testing.assert_allclose(mu @ kernel[:, 2:], mu @ kernel[:, :2] - 2.0, rtol=1e-5)
