"""The training objective: the model's loss plus pluggable regularizers.

The train step runs the model once::

    logits, intermediates, _ = model.apply(params, batch, train=True, rng=rng)
    loss, metrics = model.loss_from_logits(logits, intermediates, batch)
    for reg, aux in zip(regularizers, aux_states):
      term, reg_metrics = reg(params, batch, logits, aux, rng_for(reg))
      loss += term

A ``Regularizer`` is how the lifelong methods add terms (distillation from a teacher, L2/EWC to
anchor params): it owns an auxiliary state (teacher params, anchors, Fisher diagonals) built once by
``init_state`` and passed into the jitted step as an argument, sharded by the logical axes it
declares and never differentiated. A regularizer with ``uses_router_logits = True`` (router-level
distillation, the new-expert load balance) makes the forward pass also capture every MoE layer's
router logits (``models.router_probe``) and receives ``intermediates=`` as a keyword argument; one
that also sets ``uses_router_inputs = True`` (the router rehearsal) gets the router inputs
themselves captured too.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from lifelong_moe_jax import partitioning
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models import router_probe

PyTree = Any
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RegularizerContext:
  """What a regularizer may use to build its auxiliary state (once, before the first step).

  Attributes:
    model: the student ``LanguageModel``.
    params: the student's params at the start of training (unboxed, sharded).
    params_axes: params-structured pytree of logical ``PartitionSpec``.
    partitioner: the run's partitioner (mesh + logical rules), e.g. to shard teacher params or
      jit a Fisher computation.
    step: the step training starts (or resumes) from.
  """

  model: lm.LanguageModel
  params: PyTree
  params_axes: PyTree
  partitioner: partitioning.Partitioner
  step: int


class Regularizer(abc.ABC):
  """An extra loss term with an optional auxiliary state.

  Subclasses set ``name`` (metric prefix ``reg/<name>/``; unique within a run) and implement
  ``__call__``; those that need state (teacher params, anchors) override ``init_state``.
  """

  name: str = "regularizer"

  def init_state(self, ctx: RegularizerContext) -> tuple[PyTree, PyTree]:
    """Builds the auxiliary state.

    Returns:
      ``(aux_state, aux_logical_axes)``: a pytree of arrays and a same-structured pytree of logical
      ``PartitionSpec`` (e.g. ``ctx.params_axes`` for anchor params, a teacher model's
      ``params_logical_axes()`` for teacher params). The trainer places ``aux_state`` on the mesh
      with these shardings. Default: no state (``{}``, ``{}``).
    """
    del ctx
    return {}, {}

  # True: the student's forward pass also captures router logits (``models.router_probe``) and
  # ``__call__`` receives its ``intermediates`` collection as the keyword ``intermediates``.
  uses_router_logits: bool = False

  @abc.abstractmethod
  def __call__(
    self, params: PyTree, batch: Batch, student_logits: jax.Array, aux_state: PyTree, rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The term to add to the loss.

    Args:
      params: the student params being differentiated.
      batch: the step's batch (int32 ``[batch, length]`` features).
      student_logits: float32 ``[batch, length, vocab]`` from the step's single forward pass.
      aux_state: this regularizer's state (gradients do not flow into it).
      rng: a key private to this regularizer and step.
    Returns:
      ``(loss_term [], metrics)``; the term is added to the loss as is (apply weights inside),
      metrics are scalars logged as ``reg/<name>/<key>`` (``reg/<name>/loss`` is added).
    """


def check_regularizer_names(regularizers: Sequence[Regularizer]) -> None:
  """Raises ValueError when two regularizers share a name (their metrics would collide)."""
  names = [r.name for r in regularizers]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(
      f"Regularizer names must be unique; duplicated: {dupes}. Give each a distinct `name`."
    )


def training_loss(
  model: lm.LanguageModel,
  params: PyTree,
  batch: Batch,
  rng: jax.Array,
  regularizers: Sequence[Regularizer] = (),
  aux_states: Sequence[PyTree] = (),
) -> tuple[jax.Array, dict[str, Any]]:
  """Total loss (model loss + regularizer terms) and metrics, from one forward pass.

  Args:
    model: the language model.
    params: params to differentiate.
    batch: int32 ``[batch, length]`` features.
    rng: the step's key; the model's router jitter and each regularizer get keys folded from it.
    regularizers: extra loss terms.
    aux_states: one auxiliary state per regularizer.
  Returns:
    ``(loss [], metrics)``: ``model.loss_from_logits`` metrics with ``loss`` replaced by the total,
    ``model_loss`` (the model's own loss) and ``reg/<name>/...`` entries.
  """
  model_rng, reg_rng = jax.random.split(rng)
  capture = any(getattr(reg, "uses_router_logits", False) for reg in regularizers)
  token_inputs = any(getattr(reg, "uses_router_inputs", False) for reg in regularizers)
  with (
    router_probe.capture_router(token_inputs=token_inputs) if capture else contextlib.nullcontext()
  ):
    logits, intermediates, _ = model.apply(params, batch, train=True, rng=model_rng)
  loss, metrics = model.loss_from_logits(logits, intermediates, batch)
  metrics = dict(metrics, model_loss=loss)
  for index, (reg, aux) in enumerate(zip(regularizers, aux_states, strict=True)):
    aux = jax.lax.stop_gradient(aux)
    extra = {"intermediates": intermediates} if getattr(reg, "uses_router_logits", False) else {}
    term, reg_metrics = reg(params, batch, logits, aux, jax.random.fold_in(reg_rng, index), **extra)
    loss = loss + term
    metrics.update({f"reg/{reg.name}/{k}": v for k, v in reg_metrics.items()})
    metrics[f"reg/{reg.name}/loss"] = term
  metrics["loss"] = loss
  return loss, metrics


def evaluation_sums(model: lm.LanguageModel, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
  """Sums over the batch's weighted target tokens (eval mode, no jitter).

  Returns:
    float32 scalars ``nll_sum`` (sum of -log p(target)), ``correct_sum`` (argmax hits) and
    ``weight_sum`` (number of target tokens); loss = nll_sum / weight_sum.
  """
  return token_sums(model.logits(params, batch), batch)


def token_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  """``nll_sum``, ``correct_sum`` and ``weight_sum`` of logits [batch, length, vocab] on a batch."""
  weights = lm.loss_weights_of(batch)
  token_ll = lm.token_log_likelihood(logits, batch["decoder_target_tokens"])
  correct = (jnp.argmax(logits, axis=-1) == batch["decoder_target_tokens"]).astype(jnp.float32)
  return {
    "nll_sum": -jnp.sum(token_ll * weights),
    "correct_sum": jnp.sum(correct * weights),
    "weight_sum": jnp.sum(weights),
  }
