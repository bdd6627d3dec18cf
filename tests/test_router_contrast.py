"""``router_init="copy_contrast"``: the contrast shift (hand values, the two mean constraints, token
separation on Gaussians), its use in the surgery, and a 2-phase run whose step-0 router columns are
their sources plus the shift of independently measured moments."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import method_options
from lifelong_moe_jax.lifelong import router_contrast
from lifelong_moe_jax.lifelong import router_input
from lifelong_moe_jax.lifelong import router_rehearsal
from lifelong_moe_jax.models import lm
import tasks  # noqa: F401  (registers the seqio tasks)
from tiny_runner import TWO_PHASES, tiny_runner


def _moments(mean, cov):
  """``(mean [M, d], E[x x^T] [M, d, d])`` from means and covariances."""
  mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
  return mean, cov + mean[..., :, None] * mean[..., None, :]


def test_hand_value_with_unit_covariances():
  # mu_new = e1, mu_old = e2, both covariances I: Sigma = c I, so s = B (B^T B)^-1 [m, -m] with
  # B = [e1, e2] = I: s = (3, -3).
  new = _moments([[1.0, 0.0]], [np.eye(2)])
  old = _moments([[[0.0, 1.0]]], [[np.eye(2)]])
  shift = router_contrast.contrast_shift(*new, *old, margin=3.0)
  np.testing.assert_allclose(shift, [[3.0, -3.0]], atol=1e-6)
  assert shift.dtype == np.float32


def test_mean_constraints_hold_for_pooled_earlier_distributions():
  rng = np.random.default_rng(0)
  layers, d = 2, 6
  a = rng.normal(size=(layers, d, d))
  new = _moments(rng.normal(size=(layers, d)) + 2.0, a @ a.transpose(0, 2, 1) / d)
  old_means = rng.normal(size=(3, layers, d))
  b = rng.normal(size=(3, layers, d, d))
  old = _moments(old_means, b @ b.transpose(0, 1, 3, 2) / d)
  shift = router_contrast.contrast_shift(*new, *old, margin=2.0).astype(np.float64)
  pooled = old_means.mean(axis=0)  # the earlier distributions at equal weight
  for layer in range(layers):
    assert shift[layer] @ new[0][layer] == pytest.approx(2.0, abs=1e-4)
    assert shift[layer] @ pooled[layer] == pytest.approx(-2.0, abs=1e-4)
  np.testing.assert_allclose(
    router_contrast.contrast_shift(*new, *old, margin=0.0), np.zeros((layers, d)), atol=1e-12
  )
  # An asymmetric gap: +2 on the new data, -5 on the old; linear in the two gaps.
  lopsided = router_contrast.contrast_shift(*new, *old, margin=2.0, old_margin=5.0)
  for layer in range(layers):
    assert lopsided[layer] @ new[0][layer] == pytest.approx(2.0, abs=1e-4)
    assert lopsided[layer] @ pooled[layer] == pytest.approx(-5.0, abs=1e-4)
  up = router_contrast.contrast_shift(*new, *old, margin=1.0, old_margin=0.0)
  down = router_contrast.contrast_shift(*new, *old, margin=0.0, old_margin=1.0)
  np.testing.assert_allclose(lopsided, 2.0 * up + 5.0 * down, rtol=1e-4, atol=1e-5)
  with pytest.raises(router_contrast.ContrastError, match="old_margin"):
    router_contrast.contrast_shift(*new, *old, margin=2.0, old_margin=-1.0)


def test_tokens_split_along_the_discriminant():
  """Gaussian tokens that differ along a low-variance direction (and share a large common mean,
  like router inputs): the shift puts most new tokens above their source and most old below,
  where the difference of the means alone (no covariance) does not."""
  rng = np.random.default_rng(1)
  d, n = 8, 4000
  scales = np.array([0.05, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
  rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
  common = 5.0 * rot[:, 7]
  offset = 0.2 * rot[:, 0] + 1.0 * rot[:, 1]  # the means differ most along a high-variance one
  draw = lambda mu: mu + (rng.normal(size=(n, d)) * scales) @ rot.T  # noqa: E731
  x_new, x_old = draw(common + offset), draw(common - offset)
  moments = lambda x: (x.mean(0)[None], (x.T @ x / n)[None])  # noqa: E731
  new, old = moments(x_new), moments(x_old)
  shift = router_contrast.contrast_shift(*new, old[0][None], old[1][None], margin=2.0)[0]
  new_up, old_up = np.mean(x_new @ shift > 0), np.mean(x_old @ shift > 0)
  assert new_up > 0.9 and old_up < 0.1, (new_up, old_up)
  naive = new[0][0] - old[0][0]  # mean difference, thresholded halfway between the means
  cut = naive @ (new[0][0] + old[0][0]) / 2
  assert np.mean(x_new @ naive > cut) < 0.8  # the covariance is what separates them


@pytest.mark.parametrize(
  "new_mean, old_mean, match",
  [
    ([[1.0, 0.0]], [[[2.0, 0.0]]], "parallel"),
    ([[1.0, 0.0]], [[1.0, 0.0]], r"\[P, M, d\]"),
    ([[np.nan, 0.0]], [[[0.0, 1.0]]], "not finite"),
  ],
)
def test_bad_moments_are_refused(new_mean, old_mean, match):
  new = _moments(new_mean, [np.eye(2)])
  old_mean = np.asarray(old_mean)
  old_second = np.broadcast_to(np.eye(2), old_mean.shape + (2,))
  with pytest.raises(router_contrast.ContrastError, match=match):
    router_contrast.contrast_shift(*new, old_mean, old_second, margin=1.0)


def test_surgery_adds_the_shift_to_the_copied_columns():
  rng = np.random.default_rng(2)
  params = {"router": {"kernel": rng.normal(size=(2, 5, 3)).astype(np.float32)}}
  axes = {"router": {"kernel": P("layers", "embed", "expert")}}
  shift = rng.normal(size=(2, 5)).astype(np.float32)
  out = expansion.expand_params(
    params,
    axes,
    2,
    rng=jax.random.PRNGKey(0),
    noise_scale=0.0,
    router_init="copy_contrast",
    router_column_shift=shift,
  )
  k, got = params["router"]["kernel"], np.asarray(out["router"]["kernel"])
  np.testing.assert_array_equal(got[..., :3], k)
  for i in range(2):  # round robin: new expert 3 + i copies expert i
    np.testing.assert_allclose(got[..., 3 + i], k[..., i] + shift, atol=1e-6)
  with pytest.raises(expansion.ExpansionError, match="needs router_column_shift"):
    expansion.expand_params(params, axes, 2, rng=jax.random.PRNGKey(0), router_init="copy_contrast")
  with pytest.raises(method_options.MethodError, match="copy_contrast"):
    method_options.MethodOptions(expert_init="random", router_init="copy_contrast")


def test_two_phase_run_starts_the_new_columns_at_the_measured_shift(tmp_path, prepared_data_dir):
  runner = tiny_runner(
    str(tmp_path / "run"),
    prepared_data_dir,
    ["lifelong_moe"],
    [
      *TWO_PHASES,
      "MethodOptions.router_init = 'copy_contrast'",
      "MethodOptions.noise_scale = 0.0",
    ],
  )
  report = runner.run()
  assert report["methods"]["lifelong_moe"]["complete"]
  partitioner = partitioning.Partitioner(
    partitioning.create_mesh(partitioning.MeshConfig(-1, 1, 1))
  )
  layout, options = runner.layout, runner.layout.options_for("lifelong_moe")
  old_config, config = runner.config_for("lifelong_moe", 0), runner.config_for("lifelong_moe", 1)
  old_model = lm.LanguageModel(old_config)
  old_params = checkpoints.restore_model_params(
    layout.final_step_dir("lifelong_moe", 0), old_model, partitioner
  )
  # Independent measurement: the new phase's data and the first phase's, under phase 0's params.
  measure = lambda i: router_input.measure_phase_data_moments(  # noqa: E731
    old_model,
    old_params,
    partitioner,
    layout.schedule,
    i,
    options.usage_batches,
    data_dir=prepared_data_dir,
  )
  new, old = measure(1), measure(0)
  saved = router_rehearsal.load_moments(runner.phase_dir("lifelong_moe", 1))
  assert saved[0].shape == (1, config.num_moe_layers, config.embed_dim)
  np.testing.assert_allclose(saved[0][0], old[0], rtol=1e-5, atol=1e-6)
  want = router_contrast.contrast_shift(*new, old[0][None], old[1][None], options.router_offset)
  start = checkpoints.restore_model_params(
    os.path.join(runner.phase_dir("lifelong_moe", 1), "checkpoints", "4"),
    lm.LanguageModel(config),
    partitioner,
  )
  kernels = [
    np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(start)[0]
    if "router" in jax.tree_util.keystr(path)
  ]
  columns = np.concatenate([k.reshape((-1,) + k.shape[-2:]) for k in kernels])  # [M, d, E]
  assert columns.shape[0] == config.num_moe_layers
  first = old_config.num_experts
  for m in range(config.num_moe_layers):
    for e in range(first, config.num_experts):
      diffs = columns[m][:, e : e + 1] - columns[m][:, :first]  # against every old column
      err = np.abs(diffs - want[m][:, None]).max(axis=0)
      assert err.min() < 1e-4, (m, e, err)  # new = its source + the shift
      source = int(np.argmin(err))
      gap = (columns[m][:, e] - columns[m][:, source]) @ new[0][m]
      assert gap == pytest.approx(options.router_offset, rel=1e-3)
