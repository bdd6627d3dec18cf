"""Router rehearsal (lifelong/router_rehearsal.py): values against NumPy, kernels in MoE layer
order (scanned and unscanned), samples with the stored moments, the router-input moments of the
probe against a hand computation, and the method wiring."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import method_options
from lifelong_moe_jax.lifelong import router_rehearsal as rr
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models import router_probe
from lifelong_moe_jax.models.config import ModelConfig


def _config(scan: bool, experts: int = 4) -> ModelConfig:
  return ModelConfig(
    vocab_size=64,
    embed_dim=8,
    num_layers=4,
    num_heads=2,
    head_dim=4,
    mlp_dim=16,
    num_experts=experts,
    group_size=8,
    scan_layers=scan,
  )


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_gaussian_factors_reproduce_the_covariance():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 2, 6)) @ rng.normal(size=(6, 6)) + 3.0  # [tokens, M, d]
  mean = x.mean(0)
  second = np.einsum("tmd,tme->mde", x, x) / len(x)
  chol = rr.gaussian_factors(mean, second, jitter=0.0)
  cov = np.stack([np.cov(x[:, m].T, bias=True) for m in range(2)])
  np.testing.assert_allclose(chol @ np.swapaxes(chol, -1, -2), cov, rtol=1e-4, atol=1e-4)
  assert np.allclose(np.triu(chol[0], 1), 0.0)
  # A rank-deficient covariance (all mass on one direction) still factors with the ridge.
  flat = np.zeros((1, 4))
  second = np.zeros((1, 4, 4))
  second[0, 0, 0] = 2.0
  chol = rr.gaussian_factors(flat, second)
  rebuilt = (chol @ np.swapaxes(chol, -1, -2))[0]
  np.testing.assert_allclose(np.diag(rebuilt), [2.0 + 5e-5, 5e-5, 5e-5, 5e-5], rtol=1e-4)
  with pytest.raises(ValueError, match="does not match"):
    rr.gaussian_factors(flat, second[..., :3])


def test_rehearsal_terms_equal_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32) * 2  # [M, G, S, E]
  mask = (rng.random((2, 6)) > 0.3).astype(np.float32)  # [batch, length], G * S = 12
  old = rng.normal(size=(2, 7, 5)).astype(np.float32) * 2  # [M, N, E]
  new_t, old_t = rr.rehearsal_terms(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(old), 3)
  lp = _log_softmax(logits.astype(np.float64))
  p_new = np.exp(lp[..., 3:]).sum(-1)  # [M, G, S]
  w = mask.reshape(3, 4)
  want_new = -(np.log(p_new) * w).sum((1, 2)) / w.sum()
  lo = _log_softmax(old.astype(np.float64))
  want_old = -np.log(np.exp(lo[..., :3]).sum(-1)).mean(-1)
  np.testing.assert_allclose(np.asarray(new_t), want_new, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(old_t), want_old, rtol=1e-5)
  with pytest.raises(ValueError, match="num_old"):
    rr.rehearsal_terms(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(old), 5)


@pytest.mark.parametrize("scan", [False, True])
def test_regularizer_uses_every_layer_kernel_and_samples_the_moments(scan):
  cfg = _config(scan)
  model = lm.LanguageModel(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  num_moe = cfg.num_layers // cfg.moe_every
  rng = np.random.default_rng(2)
  mean = rng.normal(size=(2, num_moe, cfg.embed_dim))  # two earlier distributions
  a = rng.normal(size=(2, num_moe, cfg.embed_dim, cfg.embed_dim)) * 0.5
  cov = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(cfg.embed_dim)
  second = cov + mean[..., :, None] * mean[..., None, :]
  reg = rr.RouterRehearsal(
    cfg,
    2,
    nn.unbox(model.abstract_params()),
    model.params_logical_axes(),
    mean,
    second,
    weight=0.5,
    num_samples=20000,
  )
  # Kernels in MoE layer order: the logits of the router probe on a batch equal x @ kernel[m].
  batch = {
    "decoder_input_tokens": jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32),
    "decoder_target_tokens": jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32),
  }
  with router_probe.capture_router(logits=True, inputs=True, token_inputs=True):
    _, inter, _ = model.apply(params, batch)
  stats = router_probe.collect_router_stats(inter, cfg)
  kernels = np.asarray(reg.stacked_kernels(params))
  assert kernels.shape == (num_moe, cfg.embed_dim, cfg.num_experts)
  sums = np.asarray(stats[router_probe.ROUTER_INPUT_SUM])
  logit_sums = np.asarray(stats[router_probe.ROUTER_LOGITS]).sum((1, 2))
  np.testing.assert_allclose(np.einsum("md,mde->me", sums, kernels), logit_sums, rtol=1e-4)
  # The probe's Gram matrix is symmetric with the sum's outer-product structure on one token.
  gram = np.asarray(stats[router_probe.ROUTER_INPUT_GRAM])
  np.testing.assert_allclose(gram, np.swapaxes(gram, -1, -2), rtol=1e-5)
  assert np.all(np.trace(gram, axis1=1, axis2=2) >= (sums**2).sum(-1) / 16 - 1e-4)
  # Samples: per layer, half from each Gaussian, with their means and covariances.
  state, axes = reg.init_state(None)
  assert set(axes) == {"mean", "chol"}
  x = np.asarray(reg.synthetic_inputs(state, jax.random.PRNGKey(5)))
  assert x.shape == (num_moe, 2 * 20000, cfg.embed_dim)
  for p in range(2):
    part = x[:, p * 20000 : (p + 1) * 20000]
    np.testing.assert_allclose(part.mean(1), mean[p], atol=0.05)
    for m in range(num_moe):
      np.testing.assert_allclose(np.cov(part[m].T), cov[p, m], atol=0.08)
  # The term: weight * (new + old) from the same pieces.
  term, metrics = reg(params, batch, None, state, jax.random.PRNGKey(5), intermediates=inter)
  old_logits = np.einsum("mnd,mde->mne", x, kernels)
  want_old = -np.log(np.exp(_log_softmax(old_logits.astype(np.float64))[..., :2]).sum(-1)).mean()
  np.testing.assert_allclose(float(metrics["old"]), want_old, rtol=1e-4)
  x_new = np.asarray(stats[router_probe.ROUTER_INPUTS])  # [M, G, S, d]
  np.testing.assert_allclose(x_new.sum((1, 2)), sums, rtol=1e-4, atol=1e-4)  # no padding here
  new_logits = np.einsum("mgsd,mde->mgse", x_new, kernels).astype(np.float64)
  want_new = -np.log(np.exp(_log_softmax(new_logits)[..., 2:]).sum(-1)).mean()
  np.testing.assert_allclose(float(metrics["new"]), want_new, rtol=1e-4)
  np.testing.assert_allclose(float(term), 0.5 * (metrics["new"] + metrics["old"]), rtol=1e-6)


def test_gradient_of_the_term_reaches_only_the_router_kernels():
  """Both halves, through a real forward pass: no gradient reaches the shared weights."""
  cfg = _config(False)
  model = lm.LanguageModel(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  num_moe = cfg.num_layers // cfg.moe_every
  mean = np.ones((1, num_moe, cfg.embed_dim))
  second = np.broadcast_to(np.eye(cfg.embed_dim) + 1.0, (1, num_moe, cfg.embed_dim, cfg.embed_dim))
  reg = rr.RouterRehearsal(
    cfg, 2, nn.unbox(model.abstract_params()), model.params_logical_axes(), mean, second, weight=1
  )
  assert reg.uses_router_logits and reg.uses_router_inputs
  state, _ = reg.init_state(None)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)), jnp.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}

  def term(p):
    with router_probe.capture_router(token_inputs=True):
      logits, inter, _ = model.apply(p, batch)
    return reg(p, batch, logits, state, jax.random.PRNGKey(1), intermediates=inter)[0]

  grads = jax.grad(term)(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    touched = bool(np.any(np.asarray(g)))
    assert touched == ("router" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)


def test_options_validate_and_legacy_runs_read_it_as_off():
  assert method_options.LEGACY_OPTION_VALUES["router_rehearsal_weight"] == 0.0
  with pytest.raises(method_options.MethodError, match="router_rehearsal_weight"):
    method_options.MethodOptions(router_rehearsal_weight=-1.0)
  with pytest.raises(method_options.MethodError, match="router_rehearsal_samples"):
    method_options.MethodOptions(router_rehearsal_samples=0)
  cfg = expansion.expanded_config(_config(False, 2), 2)
  model = lm.LanguageModel(cfg)
  with pytest.raises(ValueError, match="do not fit"):
    rr.RouterRehearsal(
      cfg,
      2,
      nn.unbox(model.abstract_params()),
      model.params_logical_axes(),
      np.zeros((1, 3, 8)),
      np.zeros((1, 3, 8, 8)),
      weight=1.0,
    )


def test_two_phase_run_saves_the_moments_it_measured_and_trains_with_the_term(
  tmp_path, prepared_data_dir
):
  import os  # pylint: disable=import-outside-toplevel

  from lifelong_moe_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong import router_input  # pylint: disable=import-outside-toplevel
  from tiny_runner import TWO_PHASES, tiny_runner  # pylint: disable=import-outside-toplevel

  from lifelong_moe_jax.training import summaries  # pylint: disable=import-outside-toplevel

  runner = tiny_runner(
    str(tmp_path / "run"),
    prepared_data_dir,
    ["lifelong_moe"],
    [
      *TWO_PHASES,
      "MethodOptions.router_rehearsal_weight = 0.5",
      "MethodOptions.router_rehearsal_samples = 16",
    ],
  )
  report = runner.run()
  assert report["methods"]["lifelong_moe"]["complete"]
  pdir = runner.phase_dir("lifelong_moe", 1)
  mean, second = rr.load_moments(pdir)
  config0 = runner.config_for("lifelong_moe", 0)
  num_moe = config0.num_moe_layers
  assert mean.shape == (1, num_moe, config0.embed_dim)
  assert second.shape == (1, num_moe, config0.embed_dim, config0.embed_dim)
  # The saved moments are phase 0's data under phase 0's final params, measured again here.
  partitioner = partitioning.Partitioner(
    partitioning.create_mesh(partitioning.MeshConfig(-1, 1, 1))
  )
  model0 = lm.LanguageModel(config0)
  params0 = checkpoints.restore_model_params(
    runner.layout.final_step_dir("lifelong_moe", 0), model0, partitioner
  )
  options = method_options.MethodOptions()
  want_mean, want_second = router_input.measure_phase_data_moments(
    model0,
    params0,
    partitioner,
    runner.schedule,
    0,
    options.usage_batches,
    data_dir=prepared_data_dir,
  )
  np.testing.assert_allclose(mean[0], want_mean, rtol=1e-6)
  np.testing.assert_allclose(second[0], want_second, rtol=1e-6)
  records = summaries.read_jsonl(os.path.join(pdir, "train", "metrics.jsonl"))
  logged = [r for r in records if "reg/router_rehearsal/old" in r]
  assert logged, records[-1].keys()
  for r in logged:
    assert np.isfinite(r["reg/router_rehearsal/new"]) and r["reg/router_rehearsal/old"] > 0
    assert 0.0 < r["reg/router_rehearsal/old_new_mass"] < 1.0
