"""The distillation objective's optimum: exact mixture values and the (1 + w) bound."""

import numpy as np
import pytest

from lifelong_moe_jax.eval import distill_bound


def test_mixture_of_hand_values():
  fit, teacher = np.log([0.2, 0.5]), np.log([0.6, 0.1])
  np.testing.assert_allclose(
    distill_bound.mixture_log_likelihood(fit, teacher, 1.0), np.log([0.4, 0.3])
  )
  np.testing.assert_allclose(
    distill_bound.mixture_log_likelihood(fit, teacher, 0.25),
    np.log([(0.2 + 0.25 * 0.6) / 1.25, (0.5 + 0.25 * 0.1) / 1.25]),
  )
  np.testing.assert_array_equal(distill_bound.mixture_log_likelihood(fit, teacher, 0.0), fit)
  with pytest.raises(ValueError, match=">= 0"):
    distill_bound.mixture_log_likelihood(fit, teacher, -0.1)


def test_perplexity_weights_tokens_and_the_bound_is_at_most_one_plus_w_times_the_fit():
  assert distill_bound.perplexity(np.log([0.5, 0.25, 0.01]), [1, 1, 0]) == pytest.approx(
    np.exp(-(np.log(0.5) + np.log(0.25)) / 2)
  )
  rng = np.random.default_rng(0)
  fit, teacher = -rng.exponential(3.0, 1000), -rng.exponential(6.0, 1000)
  mask = (rng.random(1000) > 0.1).astype(float)
  fit_ppl = distill_bound.perplexity(fit, mask)
  for w in (0.1, 0.3, 1.0, 3.0):
    bound = distill_bound.perplexity(distill_bound.mixture_log_likelihood(fit, teacher, w), mask)
    assert bound <= (1 + w) * fit_ppl * (1 + 1e-12)
    # A mixture is never better than the better of the two models on every token.
    assert bound >= distill_bound.perplexity(np.maximum(fit, teacher), mask) * (1 - 1e-12)
