"""Distillation loss vs a NumPy reference; no gradient reaches the teacher."""

import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong.distill import Distillation, distillation_loss
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.lm import LanguageModel


def _numpy_reference(student, teacher, weights, t):
  def log_softmax(x):
    x = x / t
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

  lp, lq = log_softmax(teacher.astype(np.float64)), log_softmax(student.astype(np.float64))
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  return t * t * (kl * weights).sum() / max(weights.sum(), 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_loss_equals_numpy_reference(temperature):
  rng = np.random.default_rng(0)
  student = rng.standard_normal((3, 5, 11)).astype(np.float32) * 3
  teacher = rng.standard_normal((3, 5, 11)).astype(np.float32) * 3
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  got = distillation_loss(
    jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), temperature
  )
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(
    float(got), _numpy_reference(student, teacher, weights, temperature), rtol=1e-5
  )
  # bfloat16 logits are computed in float32.
  got16 = distillation_loss(
    jnp.asarray(student, jnp.bfloat16),
    jnp.asarray(teacher, jnp.bfloat16),
    jnp.asarray(weights),
    temperature,
  )
  assert got16.dtype == jnp.float32
  # Zero for identical distributions, and only weighted tokens count.
  assert float(
    distillation_loss(jnp.asarray(teacher), jnp.asarray(teacher), jnp.asarray(weights), temperature)
  ) == pytest.approx(0, abs=1e-6)
  masked = student.copy()
  masked[weights == 0] += 100.0
  np.testing.assert_allclose(
    float(
      distillation_loss(
        jnp.asarray(masked), jnp.asarray(teacher), jnp.asarray(weights), temperature
      )
    ),
    float(got),
    rtol=1e-5,
  )
  with pytest.raises(ValueError, match="temperature"):
    distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), 0.0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_gradient_equals_numpy_reference(temperature):
  """The fused KL's custom backward: d/ds of T^2 KL / n is T (softmax(s/T) - softmax(t/T)) w / n."""
  rng = np.random.default_rng(1)
  student = rng.standard_normal((2, 4, 13)).astype(np.float32) * 4
  teacher = rng.standard_normal((2, 4, 13)).astype(np.float32) * 4
  weights = (rng.random((2, 4)) > 0.3).astype(np.float32)
  grad = jax.grad(distillation_loss)(
    jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), temperature
  )

  def softmax(x):
    x = x.astype(np.float64) / temperature
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

  want = temperature * (softmax(student) - softmax(teacher)) * weights[..., None] / weights.sum()
  np.testing.assert_allclose(np.asarray(grad), want, atol=1e-7, rtol=1e-5)
  # Zero on unweighted tokens; no cotangent reaches the teacher.
  assert not np.any(np.asarray(grad)[weights == 0])
  teacher_grad = jax.grad(distillation_loss, argnums=1)(
    jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), temperature
  )
  assert not np.any(np.asarray(teacher_grad))


def test_log_normalizer_and_token_log_likelihood_equal_numpy():
  """Large logits (no overflow), a -inf entry, and the gradient of the log-likelihood."""
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((3, 7)).astype(np.float32) * 50 + 300
  logits[1, 2] = -np.inf
  targets = np.array([0, 3, 6])
  x = logits.astype(np.float64)
  m = x.max(-1, keepdims=True)
  lse = (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)[:, 0]
  np.testing.assert_allclose(np.asarray(lm.log_normalizer(jnp.asarray(logits))), lse, rtol=1e-6)
  ll = lm.token_log_likelihood(jnp.asarray(logits)[None], jnp.asarray(targets)[None])[0]
  np.testing.assert_allclose(np.asarray(ll), x[np.arange(3), targets] - lse, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda z: lm.token_log_likelihood(z[None], jnp.asarray(targets)[None]).sum())(
    jnp.asarray(logits)
  )
  onehot = np.eye(7)[targets]
  np.testing.assert_allclose(np.asarray(grad), onehot - np.exp(x - lse[:, None]), atol=1e-6)


def test_gradient_flows_to_student_only_through_the_regularizer_hook():
  cfg = ModelConfig(
    vocab_size=32,
    embed_dim=16,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    mlp_dim=16,
    num_experts=2,
    top_k=2,
    group_size=16,
  )
  teacher_model = LanguageModel(cfg)
  student_model = LanguageModel(expansion.expanded_config(cfg, 2))
  abstract = teacher_model.abstract_params()
  rng = np.random.default_rng(0)
  teacher = jax.tree_util.tree_map(
    lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), nn.unbox(abstract)
  )
  axes = nn.get_partition_spec(abstract)
  student = expansion.expand_params(teacher, axes, 2, rng=jax.random.PRNGKey(0), noise_scale=0.5)
  reg = Distillation(teacher_model, teacher, temperature=2.0, weight=0.5)
  ctx = types.SimpleNamespace(model=student_model, params=student, params_axes=None, step=0)
  aux, aux_axes = reg.init_state(ctx)
  assert aux is teacher
  assert jax.tree_util.tree_structure(
    aux_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  ) == jax.tree_util.tree_structure(
    axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  )
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 1, 32)
  batch = {
    "decoder_input_tokens": toks,
    "decoder_target_tokens": jnp.roll(toks, -1, axis=1),
    "decoder_loss_weights": jnp.ones((2, 8)).at[:, -1].set(0),
  }

  @jax.jit
  def run(s, t):
    def objective(s, t):
      logits = student_model.logits(s, batch)
      term, metrics = reg(s, batch, logits, t, jax.random.PRNGKey(3))
      return term, (metrics, logits, reg.teacher_logits(t, batch))

    return jax.grad(objective, argnums=(0, 1), has_aux=True)(s, t)

  (g_student, g_teacher), (metrics, s_logits, t_logits) = run(student, teacher)
  expected = _numpy_reference(
    np.asarray(s_logits), np.asarray(t_logits), np.asarray(batch["decoder_loss_weights"]), 2.0
  )
  np.testing.assert_allclose(float(metrics["kl"]), expected, rtol=1e-4)
  assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(g_teacher))
  assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_student)) > 0
  assert np.any(np.asarray(g_student["layers_1"]["moe"]["router"]["kernel"]))
  with pytest.raises(ValueError, match="vocabulary"):
    other = LanguageModel(dataclasses.replace(cfg, vocab_size=64))
    Distillation(other, teacher).init_state(ctx)
  with pytest.raises(ValueError, match="teacher_params"):
    Distillation(teacher_model).init_state(ctx)
