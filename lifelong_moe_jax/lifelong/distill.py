"""Distillation from the previous phase's model (the teacher, fewer experts) in the same step.

``distillation_loss`` is ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per target
token, averaged over target tokens with the batch's ``decoder_loss_weights`` (the same normaliser
as the LM cross-entropy). Everything is float32; the teacher logits are wrapped in
``stop_gradient``.

``Distillation`` plugs into the trainer's regularizer hook (``training.losses.Regularizer``,
duck-typed here so ``lifelong`` does not import the trainer): ``init_state(ctx)`` returns the
teacher params and their logical axes (the trainer shards them on the mesh like the student's and
passes them into the jitted step, outside the gradient), and ``__call__(params, batch,
student_logits, aux_state, rng)`` runs the teacher model on the same batch in the same step and
returns ``(weight * distillation_loss, metrics)``.

Router-level distillation (``router_weight > 0``, ``MethodOptions.router_distill_weight``): the
student's routing distribution over the *old* experts (the teacher's, i.e. the first E columns of
its router, renormalised) is matched to the teacher's on the same batch, per MoE layer:
``router_distillation_loss``. The router logits come from ``models.router_probe`` (captured in the
student's single forward pass and in the teacher's), so no layer is changed. Renormalising over the
old experts keeps the relative routing among old experts (whose columns are frozen in Lifelong-MoE,
so the term acts on the shared weights that feed the routers); it does not penalise probability
mass that moves to new experts (on new data that is wanted).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from lifelong_moe_jax.models import router_probe
from lifelong_moe_jax.models.lm import (
  Batch,
  LanguageModel,
  log_normalizer,
  loss_weights_of,
  token_mask_of,
)

Array = jax.Array


class Regularizer(Protocol):
  """The trainer's regularizer hook (mirrors ``training.losses.Regularizer``).

  ``init_state(ctx)`` runs once before training (``ctx`` has ``model``, ``params``,
  ``params_axes``, ``partitioner``, ``step``) and returns ``(aux_state, aux_logical_axes)``;
  ``__call__`` runs inside the jitted train step with this regularizer's ``aux_state`` (sharded by
  those axes, never differentiated) and returns ``(loss_term, metrics)``; the term is added to the
  loss as is, metrics are logged as ``reg/<name>/<key>``.
  """

  name: str

  def init_state(self, ctx: Any) -> tuple[Any, Any]: ...

  def __call__(
    self, params: Any, batch: Batch, student_logits: Array, aux_state: Any, rng: Array | None
  ) -> tuple[Array, dict[str, Array]]: ...


@jax.custom_vjp
def token_kl(student_logits: Array, teacher_logits: Array) -> Array:
  """``KL(softmax(teacher) || softmax(student))`` per position: ``[..., vocab] -> [...]``.

  Forward ``sum_v p_v (t_v - s_v) - lse(t) + lse(s)`` and backward ``(softmax(s) - p) * g`` are
  each one fused pass over the logits, with no ``[..., vocab]`` log-probabilities kept for the
  backward pass (the autodiff of ``sum p (log p - log_softmax(s))`` made the KL cost as much as the
  teacher's forward pass; benchmarks/distill_step.py). The teacher gets a zero cotangent: callers
  wrap it in ``stop_gradient``. float32 in, float32 out.
  """
  return _token_kl_fwd(student_logits, teacher_logits)[0]


def _token_kl_fwd(student_logits, teacher_logits):
  lse_s = log_normalizer(student_logits)
  lse_t = log_normalizer(teacher_logits)
  p = jnp.exp(teacher_logits - lse_t[..., None])
  kl = jnp.sum(p * (teacher_logits - student_logits), axis=-1) - lse_t + lse_s
  return kl, (student_logits, teacher_logits, lse_s, lse_t)


def _token_kl_bwd(residuals, g):
  student_logits, teacher_logits, lse_s, lse_t = residuals
  q = jnp.exp(student_logits - lse_s[..., None])
  p = jnp.exp(teacher_logits - lse_t[..., None])
  return (q - p) * g[..., None], jnp.zeros_like(teacher_logits)


token_kl.defvjp(_token_kl_fwd, _token_kl_bwd)


def distillation_loss(
  student_logits: Array, teacher_logits: Array, weights: Array, temperature: float = 1.0
) -> Array:
  """Token-averaged ``T^2 * KL(p_teacher || p_student)`` at temperature T.

  Args:
    student_logits: ``[batch, length, vocab]``.
    teacher_logits: ``[batch, length, vocab]`` (no gradient flows into them).
    weights: ``[batch, length]`` per-token weights (``decoder_loss_weights``; 0 = not a target).
    temperature: T > 0.
  Returns:
    float32 scalar ``T^2 * sum_t w_t KL_t / max(sum_t w_t, 1)`` with
    ``KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v))``, ``p = softmax(teacher / T)``,
    ``q = softmax(student / T)``.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}.")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"student logits {student_logits.shape} and teacher logits "
      f"{teacher_logits.shape} must have the same shape (same vocabulary)."
    )
  t = jnp.float32(temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t
  student = student_logits.astype(jnp.float32) / t
  kl = token_kl(student, teacher)  # [batch, length]
  weights = weights.astype(jnp.float32)
  return t * t * jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def router_distillation_loss(
  student_router_logits: Array, teacher_router_logits: Array, token_mask: Array
) -> Array:
  """Mean over MoE layers of the token-averaged ``KL(p_teacher || q_student_old)`` of routing.

  Args:
    student_router_logits: ``[M, G, S, E_s]`` (``router_probe``), E_s >= E_t.
    teacher_router_logits: ``[M, G, S, E_t]`` on the same batch (no gradient flows into them).
    token_mask: ``[batch, length]`` real tokens (``G * S = batch * length``, token order).
  Returns:
    float32 scalar: ``mean_m sum_t w_t KL_{m,t} / max(sum_t w_t, 1)`` with
    ``p = softmax(teacher)``, ``q = softmax(student[..., :E_t])`` (renormalised over the old
    experts), ``KL_t = sum_e p_e (log p_e - log q_e)``.
  """
  e_t = teacher_router_logits.shape[-1]
  if (
    student_router_logits.shape[:-1] != teacher_router_logits.shape[:-1]
    or student_router_logits.shape[-1] < e_t
  ):
    raise ValueError(
      f"Student router logits {student_router_logits.shape} and teacher router "
      f"logits {teacher_router_logits.shape} do not match (same layers and "
      "groups, at least the teacher's experts)."
    )
  teacher = jax.lax.stop_gradient(teacher_router_logits).astype(jnp.float32)
  student = student_router_logits[..., :e_t].astype(jnp.float32)
  kl = token_kl(student, teacher)  # [M, G, S]
  weights = token_mask.astype(jnp.float32).reshape(kl.shape[1:])
  per_layer = jnp.sum(kl * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.mean(per_layer)


class Distillation:
  """Distillation regularizer: ``weight * distillation_loss(student, teacher(batch), w, T)``
  (+ ``router_weight * router_distillation_loss`` when ``router_weight > 0``).

  Args:
    teacher_model: the previous phase's model (same architecture and vocabulary, fewer experts).
    teacher_params: its final params (unboxed); required by ``init_state``.
    temperature: T.
    weight: lambda, the loss weight.
    name: the hook's name (metrics ``reg/<name>/kl``, and ``reg/<name>/router_kl``).
    router_weight: weight of the router-level term (0: off; the student's forward pass then
      captures nothing extra).

  The teacher runs in eval mode (no router jitter, eval capacity factor), i.e. exactly as the
  previous phase's model is evaluated.
  """

  def __init__(
    self,
    teacher_model: LanguageModel,
    teacher_params: Any = None,
    *,
    temperature: float = 1.0,
    weight: float = 1.0,
    name: str = "distillation",
    router_weight: float = 0.0,
  ):
    if temperature <= 0:
      raise ValueError(f"Distillation.temperature must be positive, got {temperature}.")
    if weight < 0 or router_weight < 0:
      raise ValueError(
        f"Distillation.weight and router_weight must be >= 0, got {weight} and {router_weight}."
      )
    if router_weight > 0 and not teacher_model.config.is_moe:
      raise ValueError("Router-level distillation needs an MoE teacher.")
    self.router_weight = float(router_weight)
    self.uses_router_logits = self.router_weight > 0
    self.teacher_model = teacher_model
    self.teacher_params = teacher_params
    self.temperature = float(temperature)
    self.weight = float(weight)
    self.name = name

  def init_state(self, ctx: Any) -> tuple[Any, Any]:
    """``(teacher params, teacher logical axes)`` for the trainer to shard and carry."""
    if self.teacher_params is None:
      raise ValueError("Distillation needs teacher_params: the previous phase's final params.")
    student_vocab = ctx.model.config.vocab_size
    if self.teacher_model.config.vocab_size != student_vocab:
      raise ValueError(
        f"Teacher vocabulary ({self.teacher_model.config.vocab_size}) differs from "
        f"the student's ({student_vocab}); distillation compares the same logits."
      )
    return self.teacher_params, self.teacher_model.params_logical_axes()

  def teacher_logits(self, teacher_params: Any, batch: Batch) -> Array:
    """float32 ``[batch, length, vocab]``, with no gradient to the teacher params."""
    return self.teacher_model.logits(jax.lax.stop_gradient(teacher_params), batch)

  def __call__(
    self,
    params: Any,
    batch: Batch,
    student_logits: Array,
    aux_state: Any,
    rng: Array | None = None,
    intermediates: Any = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Returns ``(weight * kl, {"kl": kl})``; ``aux_state`` is the teacher params.

    With ``router_weight > 0``, ``intermediates`` (the student's, with captured router logits)
    is required and the result is ``(weight * kl + router_weight * router_kl, {"kl", "router_kl"})``.
    ``params`` and ``rng`` are unused (the teacher is deterministic in eval mode).
    """
    del params, rng
    if self.router_weight <= 0:
      teacher = self.teacher_logits(aux_state, batch)
      kl = distillation_loss(student_logits, teacher, loss_weights_of(batch), self.temperature)
      return self.weight * kl, {"kl": kl}
    if intermediates is None:
      raise ValueError(
        "Router-level distillation needs the student's intermediates with router "
        "logits (training.losses.training_loss passes them)."
      )
    with router_probe.capture_router():
      teacher, teacher_inter, _ = self.teacher_model.apply(jax.lax.stop_gradient(aux_state), batch)
    config = self.teacher_model.config
    key = router_probe.ROUTER_LOGITS
    student_router = router_probe.collect_router_stats(intermediates, config).get(key)
    if student_router is None:
      raise ValueError(
        "The student's intermediates hold no router logits: run its forward pass "
        "under models.router_probe.capture_router()."
      )
    teacher_router = router_probe.collect_router_stats(teacher_inter, config)[key]
    kl = distillation_loss(student_logits, teacher, loss_weights_of(batch), self.temperature)
    router_kl = router_distillation_loss(student_router, teacher_router, token_mask_of(batch))
    return (self.weight * kl + self.router_weight * router_kl, {"kl": kl, "router_kl": router_kl})
