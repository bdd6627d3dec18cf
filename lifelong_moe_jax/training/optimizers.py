"""Optimizers and learning-rate schedules chosen in gin (t5x defaults: Adafactor + rsqrt decay).

    lr = learning_rate_schedule()                  # gin: learning_rate_schedule.kind = "cosine" ...
    opt = create_optimizer(train_steps=1000)       # gin: create_optimizer.name = "adamw" ...
    opt.tx                                         # optax.GradientTransformation (clipping included)
    opt.learning_rate(step)                        # the schedule, logged as ``learning_rate``

Schedules (``step`` counts completed optimizer updates, starting at 0):

* ``rsqrt``: linear warmup from 0 to ``peak_learning_rate`` over ``warmup_steps``, then
  ``peak * sqrt(warmup_steps / step)`` (t5x's inverse square-root decay); independent of the run
  length, so extending ``TRAIN_STEPS`` on resume does not change the past schedule.
* ``cosine``: linear warmup, then cosine decay to ``end_learning_rate_ratio * peak`` at
  ``decay_steps`` (default: the run's ``train_steps``), via ``optax.warmup_cosine_decay_schedule``.
* ``constant``: linear warmup, then constant.

``with_phase_warmups(schedule, phase_starts, warmup_steps)`` re-warms any schedule at given steps
(the lifelong runner's ``MethodOptions.phase_warmup_steps``): the base value is multiplied by
``min(1, (step - s) / warmup_steps)`` where ``s`` is the latest phase start ``<= step``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import optax

OptimizerWrapper = Callable[[optax.GradientTransformation], optax.GradientTransformation]
SCHEDULES = ("rsqrt", "cosine", "constant")
OPTIMIZERS = ("adafactor", "adamw")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and the learning-rate schedule it uses.

  Attributes:
    tx: the full update rule (gradient clipping, the optimizer, and any wrapper applied on top).
    learning_rate: ``step -> learning rate``, evaluated inside the train step for logging.
    name: "adafactor" or "adamw" (recorded in checkpoint metadata).
    clip_grad_norm: the global-norm clipping threshold in ``tx`` (None: no clipping), for messages.
  """

  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  name: str
  clip_grad_norm: float | None = None

  def wrapped(self, wrapper: OptimizerWrapper | None) -> "Optimizer":
    """This optimizer with ``wrapper(tx)`` as its update rule (e.g. a freezing mask)."""
    if wrapper is None:
      return self
    return dataclasses.replace(self, tx=wrapper(self.tx))


def _linear_warmup(peak: float, warmup_steps: int) -> optax.Schedule:
  return optax.linear_schedule(0.0, peak, max(warmup_steps, 1))


@gin.configurable
def learning_rate_schedule(
  kind: str = "rsqrt",
  peak_learning_rate: float = 1e-2,
  warmup_steps: int = 1000,
  decay_steps: int | None = None,
  end_learning_rate_ratio: float = 0.0,
  train_steps: int | None = None,
) -> optax.Schedule:
  """Builds the learning-rate schedule (see the module docstring).

  Args:
    kind: "rsqrt", "cosine" or "constant".
    peak_learning_rate: value reached at the end of warmup.
    warmup_steps: linear warmup length (0 disables warmup).
    decay_steps: cosine only: step at which the decay ends (default ``train_steps``).
    end_learning_rate_ratio: cosine only: final value as a fraction of the peak.
    train_steps: the run's total steps (used as the cosine default).
  Raises:
    ValueError: unknown kind or inconsistent lengths.
  """
  if kind not in SCHEDULES:
    raise ValueError(f"learning_rate_schedule.kind must be one of {SCHEDULES}, got {kind!r}.")
  if peak_learning_rate <= 0 or warmup_steps < 0:
    raise ValueError(
      "learning_rate_schedule needs peak_learning_rate > 0 and warmup_steps >= 0, "
      f"got {peak_learning_rate} and {warmup_steps}."
    )
  if kind == "cosine":
    decay = decay_steps or train_steps
    if not decay or decay <= warmup_steps:
      raise ValueError(
        f"Cosine decay needs decay_steps (or train_steps) > warmup_steps={warmup_steps}, got "
        f"{decay}. Set learning_rate_schedule.decay_steps."
      )
    return optax.warmup_cosine_decay_schedule(
      0.0,
      peak_learning_rate,
      warmup_steps,
      decay,
      end_value=peak_learning_rate * end_learning_rate_ratio,
    )
  if kind == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(peak_learning_rate)
    return optax.join_schedules(
      [
        _linear_warmup(peak_learning_rate, warmup_steps),
        optax.constant_schedule(peak_learning_rate),
      ],
      [warmup_steps],
    )

  # rsqrt
  def rsqrt(step):
    step = jnp.asarray(step, jnp.float32)
    return peak_learning_rate * jnp.sqrt(
      max(warmup_steps, 1) / jnp.maximum(step, max(warmup_steps, 1))
    )

  if warmup_steps == 0:
    return rsqrt
  return lambda step: jnp.where(
    step < warmup_steps, _linear_warmup(peak_learning_rate, warmup_steps)(step), rsqrt(step)
  )


def with_phase_warmups(
  schedule: optax.Schedule, phase_starts: Sequence[int], warmup_steps: int
) -> optax.Schedule:
  """``schedule`` re-warmed linearly from 0 at every step in ``phase_starts``.

  ``lr(step) = schedule(step) * min(1, (step - s) / warmup_steps)`` with ``s`` the latest start
  ``<= step``; before the first start (and with ``warmup_steps == 0``) it is ``schedule(step)``.
  ``step`` counts completed updates, so the first update of a phase starting at ``s`` uses
  learning rate 0, like the first update of a run under the base warmup.

  Args:
    schedule: the base schedule (e.g. ``learning_rate_schedule()``).
    phase_starts: global steps where phases start (steps <= 0 are ignored: the base schedule
      warms up the first phase).
    warmup_steps: re-warm length (>= 0).
  Raises:
    ValueError: negative ``warmup_steps``.
  """
  if warmup_steps < 0:
    raise ValueError(f"phase warmup_steps must be >= 0, got {warmup_steps}.")
  starts = sorted({int(s) for s in phase_starts if int(s) > 0})
  if not warmup_steps or not starts:
    return schedule

  def rewarmed(step):
    step_f = jnp.asarray(step, jnp.float32)
    factor = jnp.ones_like(step_f)
    for start in starts:  # ascending: the latest start at or before ``step`` wins.
      ramp = jnp.clip((step_f - start) / warmup_steps, 0.0, 1.0)
      factor = jnp.where(step_f >= start, ramp, factor)
    return schedule(step) * factor

  return rewarmed


def phase_warmup_schedule(
  phase_starts: Sequence[int], warmup_steps: int, *, train_steps: int | None = None
) -> optax.Schedule | None:
  """The gin-configured ``learning_rate_schedule(train_steps=...)`` re-warmed at every phase start
  (``with_phase_warmups``), or None when ``warmup_steps == 0`` (keep ``create_optimizer``'s
  default schedule)."""
  if not warmup_steps:
    return None
  return with_phase_warmups(
    learning_rate_schedule(train_steps=train_steps), phase_starts, warmup_steps
  )


def _decay_mask(params) -> object:
  """Weight decay only on matrices (kernels, embeddings, experts), not on norm scales."""
  return jax.tree_util.tree_map(lambda p: getattr(p, "ndim", 0) >= 2, params)


@gin.configurable
def create_optimizer(
  name: str = "adafactor",
  schedule: optax.Schedule | None = None,
  *,
  train_steps: int | None = None,
  clip_grad_norm: float | None = 1.0,
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  adafactor_decay_rate: float = 0.8,
  adafactor_clipping_threshold: float | None = 1.0,
  adafactor_multiply_by_parameter_scale: bool = True,
  adafactor_momentum: float | None = None,
  adafactor_min_dim_size_to_factor: int = 128,
) -> Optimizer:
  """The optimizer of a run.

  Args:
    name: "adafactor" (default, ``optax.adafactor``) or "adamw" (``optax.adamw``).
    schedule: learning-rate schedule (default: ``learning_rate_schedule(train_steps=...)``, gin).
    train_steps: run length, passed to the default schedule (cosine decay length).
    clip_grad_norm: ``optax.clip_by_global_norm`` threshold applied first; None disables.
    weight_decay: decoupled weight decay on >=2-D params (AdamW's ``weight_decay``, Adafactor's
      ``weight_decay_rate``); 0 disables.
    b1, b2, eps: AdamW moments.
    adafactor_*: the corresponding ``optax.adafactor`` arguments.
  Raises:
    ValueError: unknown optimizer name.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"create_optimizer.name must be one of {OPTIMIZERS}, got {name!r}.")
  schedule = schedule if schedule is not None else learning_rate_schedule(train_steps=train_steps)
  if name == "adafactor":
    base = optax.adafactor(
      learning_rate=schedule,
      min_dim_size_to_factor=adafactor_min_dim_size_to_factor,
      decay_rate=adafactor_decay_rate,
      multiply_by_parameter_scale=adafactor_multiply_by_parameter_scale,
      clipping_threshold=adafactor_clipping_threshold,
      momentum=adafactor_momentum,
      weight_decay_rate=weight_decay or None,
      weight_decay_mask=_decay_mask if weight_decay else None,
    )
  else:
    base = optax.adamw(
      learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask
    )
  parts = ([optax.clip_by_global_norm(clip_grad_norm)] if clip_grad_norm else []) + [base]
  return Optimizer(
    tx=optax.chain(*parts), learning_rate=schedule, name=name, clip_grad_norm=clip_grad_norm or None
  )
