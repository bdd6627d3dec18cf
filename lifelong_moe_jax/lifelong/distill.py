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
"""
from __future__ import annotations

from typing import Any, Protocol

import gin
import jax
import jax.numpy as jnp

from lifelong_moe_jax.models.lm import Batch, LanguageModel, loss_weights_of

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

  def init_state(self, ctx: Any) -> tuple[Any, Any]:
    ...

  def __call__(self, params: Any, batch: Batch, student_logits: Array, aux_state: Any,
               rng: Array | None) -> tuple[Array, dict[str, Array]]:
    ...


def distillation_loss(student_logits: Array, teacher_logits: Array, weights: Array,
                      temperature: float = 1.0) -> Array:
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
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} must have the same shape (same vocabulary).")
  t = jnp.float32(temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t
  student = student_logits.astype(jnp.float32) / t
  log_p = jax.nn.log_softmax(teacher, axis=-1)
  log_q = jax.nn.log_softmax(student, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [batch, length]
  weights = weights.astype(jnp.float32)
  return t * t * jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@gin.configurable(denylist=["teacher_model", "teacher_params"])
class Distillation:
  """Distillation regularizer: ``weight * distillation_loss(student, teacher(batch), w, T)``.

  Args:
    teacher_model: the previous phase's model (same architecture and vocabulary, fewer experts).
    teacher_params: its final params (unboxed); required by ``init_state``.
    temperature: T.
    weight: lambda, the loss weight.
    name: the hook's name (metrics ``reg/<name>/kl``).

  The teacher runs in eval mode (no router jitter, eval capacity factor), i.e. exactly as the
  previous phase's model is evaluated.
  """

  def __init__(self, teacher_model: LanguageModel, teacher_params: Any = None, *,
               temperature: float = 1.0, weight: float = 1.0, name: str = "distillation"):
    if temperature <= 0:
      raise ValueError(f"Distillation.temperature must be positive, got {temperature}.")
    if weight < 0:
      raise ValueError(f"Distillation.weight must be >= 0, got {weight}.")
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
      raise ValueError(f"Teacher vocabulary ({self.teacher_model.config.vocab_size}) differs from "
                       f"the student's ({student_vocab}); distillation compares the same logits.")
    return self.teacher_params, self.teacher_model.params_logical_axes()

  def teacher_logits(self, teacher_params: Any, batch: Batch) -> Array:
    """float32 ``[batch, length, vocab]``, with no gradient to the teacher params."""
    return self.teacher_model.logits(jax.lax.stop_gradient(teacher_params), batch)

  def __call__(self, params: Any, batch: Batch, student_logits: Array, aux_state: Any,
               rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Returns ``(weight * kl, {"kl": kl})``; ``aux_state`` is the teacher params.

    ``params`` and ``rng`` are unused (the teacher is deterministic in eval mode).
    """
    del params, rng
    teacher = self.teacher_logits(aux_state, batch)
    kl = distillation_loss(student_logits, teacher, loss_weights_of(batch), self.temperature)
    return self.weight * kl, {"kl": kl}
