"""Checked expert expansion at the start of a phase: validation, idempotency, ``expand_for_phase``.

``validate_expansion`` checks a param surgery (shapes; old slices and non-expert params
bit-identical); ``expansion_needed`` / ``check_not_already_expanded`` compare the params with the
phase record so a phase never adds its experts twice; ``expand_for_phase`` runs the param surgery
(``expansion.expand_params``) and the optimizer-state surgery
(``opt_state_expansion.expand_opt_state``) with both checks and appends the phase to the record.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lifelong_moe_jax.lifelong.expansion import (
  ExpansionError,
  InitMode,
  NewSliceState,
  RouterInit,
  SourceExperts,
  expand_params,
  source_indices,
)
from lifelong_moe_jax.lifelong.opt_state_expansion import expand_opt_state
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.param_tree import (
  expert_counts,
  flatten_with_axes,
  grown_shape,
  num_experts_of,
)


class AlreadyExpandedError(ExpansionError):
  """The checkpoint was already expanded for this phase; expanding again would add experts twice."""


# ------------------------------------------------------------------------------- validation
def _bits(x: jax.Array) -> jax.Array:
  """Array reinterpreted as unsigned ints of the same width (bit-exact comparison, NaN-safe)."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
  return x


@functools.partial(jax.jit, static_argnums=(2, 3))
def _prefix_bit_equal(new: jax.Array, old: jax.Array, axis: int, size: int) -> jax.Array:
  """Whether ``new[..., :size, ...]`` (along ``axis``) has exactly the bits of ``old``."""
  return jnp.array_equal(_bits(jax.lax.slice_in_dim(new, 0, size, axis=axis)), _bits(old))


@jax.jit
def _bit_equal(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.array_equal(_bits(a), _bits(b))


def validate_expansion(
  old_params: Any, new_params: Any, params_axes: Any, add_experts: int
) -> None:
  """Checks an expansion: shapes, and old slices (and non-expert params) bit-identical.

  Comparisons run on device under jit (one boolean per leaf comes back), so sharded params are not
  gathered onto the host.

  Raises:
    ExpansionError naming the first offending param.
  """
  old_def, old_infos = flatten_with_axes(old_params, params_axes)
  new_def = jax.tree_util.tree_structure(new_params)
  if old_def != new_def:
    raise ExpansionError(
      f"Expanded params have a different tree structure: {new_def} vs {old_def}."
    )
  num_experts = num_experts_of(old_params, params_axes)
  for info, new in zip(old_infos, jax.tree_util.tree_leaves(new_params)):
    old_shape, new_shape = tuple(np.shape(info.value)), tuple(np.shape(new))
    if info.expert_axis is None:
      if new_shape != old_shape:
        raise ExpansionError(
          f"{info.key}: a non-expert param changed shape {old_shape} -> {new_shape}."
        )
      if new is not info.value and not bool(_bit_equal(new, info.value)):
        raise ExpansionError(f"{info.key}: a non-expert param changed value during surgery.")
      continue
    want = grown_shape(old_shape, info.expert_axis, add_experts)
    if new_shape != want:
      raise ExpansionError(
        f"{info.key}: expected shape {want} (E={num_experts} + {add_experts} "
        f"along axis {info.expert_axis}), got {new_shape}."
      )
    if not bool(_prefix_bit_equal(new, info.value, info.expert_axis, num_experts)):
      raise ExpansionError(
        f"{info.key}: the old expert slices [0, {num_experts}) are not bit-identical to the input."
      )


# ------------------------------------------------------------------------------- idempotency
def expansion_needed(record: PhaseRecord, phase_name: str, params: Any, params_axes: Any) -> bool:
  """Whether phase ``phase_name`` still has to expand these params.

  Returns False when the record already holds ``phase_name`` and the params have its expert count
  (the expansion happened and was saved: resume from it); True when the phase is not yet recorded
  and the params match the record's latest phase.

  Raises:
    ExpansionError when params and record disagree (e.g. params expanded but the record not saved).
  """
  count = num_experts_of(params, params_axes)
  if phase_name in record:
    phase = record.phase(phase_name)
    if record.phases[-1].name != phase_name:
      raise ExpansionError(
        f"Phase {phase_name!r} is recorded but is not the latest phase "
        f"({record.phases[-1].name!r}); the checkpoint is from a later phase."
      )
    if count != phase.num_experts:
      raise ExpansionError(
        f"The record says phase {phase_name!r} has {phase.num_experts} experts "
        f"but the params have {count}."
      )
    return False
  if count != record.num_experts:
    raise ExpansionError(
      f"The params have {count} experts but the phase record says "
      f"{record.num_experts} after phase {record.phases[-1].name!r}: the "
      "checkpoint and its phase record disagree (was surgery interrupted before "
      "both were saved?)."
    )
  return True


def check_not_already_expanded(
  record: PhaseRecord, phase_name: str, params: Any, params_axes: Any
) -> None:
  """Raises AlreadyExpandedError if ``record`` says the params were expanded for ``phase_name``."""
  if not expansion_needed(record, phase_name, params, params_axes):
    phase = record.phase(phase_name)
    raise AlreadyExpandedError(
      f"This checkpoint was already expanded for phase {phase_name!r} ({phase.added_experts} "
      f"experts added, now {phase.num_experts}); expanding again would add experts twice. Resume "
      "from it instead."
    )


@dataclasses.dataclass(frozen=True)
class ExpansionResult:
  """Output of ``expand_for_phase``."""

  params: Any
  opt_state: Any
  record: PhaseRecord


def expand_for_phase(
  params: Any,
  params_axes: Any,
  record: PhaseRecord,
  *,
  phase_name: str,
  mixture: str,
  steps: int,
  method: str,
  add_experts: int,
  init: InitMode,
  rng: jax.Array,
  noise_scale: float = 0.01,
  source_experts: SourceExperts = "round_robin",
  model_for_random_init: Any = None,
  opt_state: Any = None,
  tx: optax.GradientTransformation | None = None,
  router_init: RouterInit = "copy",
  router_offset: float = 1.0,
  router_input_mean: Any = None,
  router_column_shift: Any = None,
  new_slice_opt_state: NewSliceState = "zeros",
) -> ExpansionResult:
  """Checked surgery for the start of a phase: params, optimizer state and the phase record.

  Refuses (AlreadyExpandedError) when the record already holds ``phase_name``; validates the
  record against the params before and the result after. ``router_*`` go to ``expand_params``,
  ``new_slice_opt_state`` to ``expand_opt_state`` (with the source experts ``expand_params``
  copied); non-default values are written to the phase's ``extra``.
  """
  check_not_already_expanded(record, phase_name, params, params_axes)
  new_params = expand_params(
    params,
    params_axes,
    add_experts,
    init=init,
    rng=rng,
    noise_scale=noise_scale,
    source_experts=source_experts,
    model_for_random_init=model_for_random_init,
    router_init=router_init,
    router_offset=router_offset,
    router_input_mean=router_input_mean,
    router_column_shift=router_column_shift,
  )
  validate_expansion(params, new_params, params_axes, add_experts)
  sources = (
    source_indices(source_experts, record.num_experts, add_experts)
    if new_slice_opt_state == "source" and add_experts
    else None
  )
  new_opt = (
    None
    if opt_state is None
    else expand_opt_state(
      opt_state,
      params,
      params_axes,
      add_experts,
      tx=tx,
      new_slices=new_slice_opt_state,
      source_experts=sources,
    )
  )
  extra = {"noise_scale": noise_scale} if init == "copy" and add_experts else {}
  if init == "copy" and add_experts and not isinstance(source_experts, str):
    extra["source_experts"] = np.asarray(
      source_indices(source_experts, record.num_experts, add_experts)
    ).tolist()
  if add_experts and router_init != "copy":
    extra["router_init"] = router_init
    if router_init in ("copy_offset", "copy_contrast"):
      extra["router_offset"] = float(router_offset)
  if add_experts and new_slice_opt_state != "zeros":
    extra["new_slice_opt_state"] = new_slice_opt_state
  new_record = record.append_phase(
    phase_name,
    mixture=mixture,
    steps=steps,
    method=method,
    add_experts=add_experts,
    init=init if add_experts else None,
    extra=extra,
  )
  new_record.validate_expert_counts(expert_counts(new_params, params_axes))
  return ExpansionResult(new_params, new_opt, new_record)
