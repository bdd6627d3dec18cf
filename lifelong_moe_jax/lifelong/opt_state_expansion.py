"""Expert-expansion surgery of the optimizer state: grow it to match ``expansion.expand_params``.

Every state leaf that follows an expert param grows along its expert axis with zeros (default), its
source expert's slice or the mean of the old slices (old slices kept); Adafactor's factored
statistics are handled, including the case where the growth changes which two dimensions Adafactor
factors. Like the param surgery (``expansion``), every computation runs under ``jax.jit`` with the
input leaf's sharding, so sharded state stays sharded.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lifelong_moe_jax import partitioning
from lifelong_moe_jax import param_tree
from lifelong_moe_jax.lifelong.expansion import (
  NEW_SLICE_STATES,
  ExpansionError,
  NewSliceState,
  expanded_abstract_params,
  take_sources,
)
from lifelong_moe_jax.param_tree import (
  expert_axis,
  flatten_with_axes,
  grown_shape,
  jit_with_shardings,
  moe_layer_rows,
  out_sharding,
  pad_experts,
  path_names,
)


def _top2_dims(shape: Sequence[int]) -> tuple[int, int]:
  """``(d1, d0)``: Adafactor's second-largest and largest dims (optax's own ``np.argsort`` rule)."""
  order = np.argsort(shape)
  return int(order[-2]), int(order[-1])


def _is_factored_state(x: Any) -> bool:
  return isinstance(x, optax.FactoredState)


@functools.lru_cache(maxsize=None)
def _refactor_fn(
  old_dims: tuple[int, int] | None,
  new_dims: tuple[int, int] | None,
  axis: int,
  add: int,
  mode: str = "zeros",
  rows: Any = None,
  layers_axis: int | None = None,
) -> Callable:
  """Jitted (v_row, v_col, v) -> new (v_row, v_col, v) through the full second-moment estimate.

  Adafactor's estimate is ``V = v_row * v_col / mean(v_row over the remaining factored dim)``
  (the quantity its update divides by); V is grown with new slices (zeros, its source slices
  ``rows`` (a hashable tuple), or the mean of its old slices; see ``_grow_slices``) and re-factored
  in the new layout, so the update of old slices is unchanged up to rounding.
  """

  def refactor(v_row, v_col, v):
    if old_dims is None:
      full = v.astype(jnp.float32)
    else:
      d1, d0 = old_dims
      reduced_d1 = d1 - 1 if d1 > d0 else d1
      mean = jnp.mean(v_row.astype(jnp.float32), axis=reduced_d1, keepdims=True)
      row = jnp.where(mean > 0, v_row / jnp.where(mean > 0, mean, 1.0), 0.0)
      full = jnp.expand_dims(row, d0) * jnp.expand_dims(v_col.astype(jnp.float32), d1)
    if mode == "zeros":
      full = jnp.pad(full, [(0, add if d == axis else 0) for d in range(full.ndim)])
    else:
      full = jnp.concatenate(
        [
          full,
          _new_state_slices(
            full, axis, layers_axis, add, mode, None if rows is None else np.asarray(rows)
          ),
        ],
        axis=axis,
      )
    dtype = v.dtype
    placeholder = jnp.zeros((1,), dtype)
    if new_dims is None:
      return placeholder, placeholder, full.astype(dtype)
    d1, d0 = new_dims
    return (
      jnp.mean(full, axis=d0).astype(dtype),
      jnp.mean(full, axis=d1).astype(dtype),
      placeholder,
    )

  return jax.jit(refactor)


def _new_state_slices(
  x: jax.Array, axis: int, layers_axis: int | None, add: int, mode: str, rows: np.ndarray | None
) -> jax.Array:
  """The ``add`` new slices of a state leaf: its source slices ("source") or the mean of its old
  slices ("mean"), along ``axis``."""
  if mode == "mean":
    mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
    return jnp.repeat(mean, add, axis=axis)
  return take_sources(x, axis, layers_axis, rows)


def _grow_slices(
  value: Any,
  axis: int,
  layers_axis: int | None,
  add: int,
  mode: str,
  rows: np.ndarray | None,
  key: str,
) -> jax.Array:
  """``value`` grown by ``add`` slices along ``axis`` (``mode``: "zeros", "source" or "mean"),
  sharded like ``value``."""
  if mode == "zeros":
    return pad_experts(value, axis, add, key)
  if mode == "source" and rows is None:
    raise ExpansionError(f"{key}: new_slices='source' needs the source expert of every new expert.")
  sharding = out_sharding(value, grown_shape(np.shape(value), axis, add), key)

  def grow(x):
    return jnp.concatenate([x, _new_state_slices(x, axis, layers_axis, add, mode, rows)], axis=axis)

  return jit_with_shardings(grow, sharding)(value)


def _hashable(rows: np.ndarray | None) -> Any:
  return None if rows is None else tuple(map(tuple, rows)) if rows.ndim == 2 else tuple(rows)


def _match_param(names: tuple[str, ...], table: dict) -> tuple[str, ...] | None:
  """The key of ``table`` (param names) that ``names`` (a state leaf's path) ends with."""
  return next((names[s:] for s in range(len(names)) if names[s:] in table), None)


def _minus(shape: Sequence[int], dim: int) -> tuple[int, ...]:
  return tuple(s for d, s in enumerate(shape) if d != dim)


def _axis_without(axis: int, deleted: int) -> int | None:
  """Position of ``axis`` once dimension ``deleted`` is removed (None if it is the deleted one)."""
  if axis == deleted:
    return None
  return axis - 1 if axis > deleted else axis


def _expand_factored(
  state: Any,
  target: Any,
  param_info: dict,
  add: int,
  mode: str = "zeros",
  source_rows: dict | None = None,
) -> Any:
  """Expands one ``optax.FactoredState`` (Adafactor's second moments).

  For each param: when the factored layout (which two dims are factored, or none) is the same
  before and after the growth, ``v_row``/``v_col``/``v`` are grown with new slices (``mode``, see
  ``expand_opt_state``) along the expert axis they keep (old statistics bit-exact); otherwise they
  are re-factored via ``_refactor_fn``. ``count`` is unchanged. ``param_info`` maps param names to
  ``(shape, expert axis, layers axis)``; ``source_rows`` param names to source experts.
  """
  flat_row, tdef = jax.tree_util.tree_flatten_with_path(state.v_row)
  flat_col, flat_v = tdef.flatten_up_to(state.v_col), tdef.flatten_up_to(state.v)
  t_v = None if target is None else tdef.flatten_up_to(target.v)
  out_row, out_col, out_v = [], [], []
  for k, (path, v_row) in enumerate(flat_row):
    v_col, v = flat_col[k], flat_v[k]
    names = path_names(path)
    key = "/".join(names)
    pkey = _match_param(names, param_info)
    match = None if pkey is None else param_info[pkey]
    if match is None or match[1] is None:  # not an expert param: unchanged.
      out_row.append(v_row), out_col.append(v_col), out_v.append(v)
      continue
    shape, axis, layers = match
    rows = (source_rows or {}).get(pkey)
    new_shape = grown_shape(shape, axis, add)
    old_dims = None if tuple(np.shape(v)) == shape else _top2_dims(shape)
    if old_dims is not None and (
      tuple(np.shape(v_row)) != _minus(shape, old_dims[1])
      or tuple(np.shape(v_col)) != _minus(shape, old_dims[0])
    ):
      raise ExpansionError(
        f"{key}: Adafactor statistics of shapes {np.shape(v_row)}, "
        f"{np.shape(v_col)} do not factor a param of shape {shape}."
      )
    if t_v is not None:
      new_dims = None if tuple(t_v[k].shape) == new_shape else _top2_dims(new_shape)
    elif old_dims is not None and _top2_dims(new_shape) != old_dims:
      raise ExpansionError(
        f"Adafactor factors {key} over dims {old_dims} at shape {shape} but would factor dims "
        f"{_top2_dims(new_shape)} at {new_shape}: pass tx= to expand_opt_state so the new layout "
        "is known and the statistics are re-factored."
      )
    else:
      new_dims = old_dims
    if new_dims != old_dims:
      if mode == "source" and rows is None:
        raise ExpansionError(f"{key}: new_slices='source' needs the source experts.")
      args = (old_dims, new_dims, axis, add) + (
        (mode, _hashable(rows), layers) if mode != "zeros" else ()
      )
      row, col, full = _refactor_fn(*args)(v_row, v_col, v)
    elif old_dims is None:
      row, col, full = v_row, v_col, _grow_slices(v, axis, layers, add, mode, rows, key)
    else:
      d1, d0 = old_dims
      row_axis, col_axis = _axis_without(axis, d0), _axis_without(axis, d1)
      row_layers = None if layers is None else _axis_without(layers, d0)
      col_layers = None if layers is None else _axis_without(layers, d1)
      row = (
        v_row
        if row_axis is None
        else _grow_slices(v_row, row_axis, row_layers, add, mode, rows, key + "/v_row")
      )
      col = (
        v_col
        if col_axis is None
        else _grow_slices(v_col, col_axis, col_layers, add, mode, rows, key + "/v_col")
      )
      full = v
    out_row.append(row), out_col.append(col), out_v.append(full)
  unflat = functools.partial(jax.tree_util.tree_unflatten, tdef)
  return state._replace(v_row=unflat(out_row), v_col=unflat(out_col), v=unflat(out_v))


def expand_opt_state(
  opt_state: Any,
  params_before: Any,
  params_axes_before: Any,
  add_experts: int,
  *,
  tx: optax.GradientTransformation | None = None,
  new_slices: NewSliceState = "zeros",
  source_experts: Any = None,
) -> Any:
  """Grows the optimizer state to match ``expand_params`` (old slices kept; new slices zero, copied
  from their source expert, or the mean of the old slices).

  A state leaf follows a param when its key path ends with the param's path
  (``partitioning.state_logical_axes``); its expert axis comes from the param's logical axes.
  Adam's ``mu``/``nu``, momentum traces, gradient accumulators and non-factored Adafactor ``v``
  grow like the param; Adafactor's factored ``v_row``/``v_col`` grow along the expert axis when
  they keep it; counts, schedule state and ``(1,)`` placeholders are returned unchanged.

  Args:
    opt_state: optimizer state for ``params_before`` (e.g. after training the previous phase).
    params_before: the params (or ``ShapeDtypeStruct``s) before expansion.
    params_axes_before: their logical axes.
    add_experts: N.
    tx: the optimizer (recommended). When given, the result is checked against the structure and
      shapes of ``tx.init(expanded params)``, and Adafactor statistics whose factored dimensions
      change with the growth (e.g. a router kernel ``[768, 64] -> [768, 128]`` crossing
      ``min_dim_size_to_factor``) are re-factored. Without it, such a change raises
      ExpansionError when it is detectable from the shapes.
    new_slices: statistics of the new slices: ``"zeros"`` (default), ``"source"`` (a copy of the
      source expert's slice of every statistic: momentum, ``mu``/``nu``, Adafactor's ``v`` and its
      factored ``v_row``/``v_col``) or ``"mean"`` (the mean of the old slices, per statistic and per
      scanned block). When the growth changes Adafactor's factored layout, the full estimate is
      grown that way and re-factored.
    source_experts: "source": int ``[N]`` or ``[num_moe_layers, N]`` source expert of every new
      expert (as ``expand_params`` chose them; ``source_indices``).
  Returns:
    The expanded optimizer state (new leaves sharded like the old ones).
  """
  if add_experts < 0:
    raise ExpansionError(f"add_experts must be >= 0, got {add_experts}.")
  if new_slices not in NEW_SLICE_STATES:
    raise ExpansionError(f"new_slices must be one of {NEW_SLICE_STATES}, got {new_slices!r}.")
  if new_slices == "source" and source_experts is None:
    raise ExpansionError(
      "new_slices='source' needs source_experts (the source expert of every new expert)."
    )
  if add_experts == 0:
    return opt_state
  _, infos = flatten_with_axes(params_before, params_axes_before)
  param_info = {i.names: (tuple(np.shape(i.value)), i.expert_axis, i.layers_axis) for i in infos}
  source_rows: dict = {}
  if new_slices == "source":
    sources = np.asarray(source_experts, np.int32)
    if sources.shape[-1] != add_experts:
      raise ExpansionError(
        f"source_experts has {sources.shape[-1]} entries per layer, expected {add_experts}."
      )
    keyed = (
      {i.key: sources for i in infos if i.expert_axis is not None}
      if sources.ndim == 1
      else moe_layer_rows(infos, sources, "source_experts")
    )
    source_rows = {i.names: keyed[i.key] for i in infos if i.key in keyed}
  specs = partitioning.state_logical_axes(opt_state, params_before, params_axes_before)
  target = None
  if tx is not None:
    target = jax.eval_shape(
      tx.init, expanded_abstract_params(params_before, params_axes_before, add_experts)
    )
    want, got = jax.tree_util.tree_structure(target), jax.tree_util.tree_structure(opt_state)
    if want != got:
      raise ExpansionError(
        f"opt_state does not have the structure of tx.init(params): {got} vs "
        f"{want}. Pass the optimizer that made the state."
      )

  def expand(path, value, spec, *maybe_target):
    if _is_factored_state(value):
      return _expand_factored(
        value,
        maybe_target[0] if maybe_target else None,
        param_info,
        add_experts,
        new_slices,
        source_rows,
      )
    ea = expert_axis(spec)
    if ea is None or np.ndim(value) == 0:
      return value
    if new_slices == "zeros":
      return pad_experts(value, ea, add_experts, jax.tree_util.keystr(path))
    pkey = _match_param(path_names(path), param_info)
    return _grow_slices(
      value,
      ea,
      param_tree.axis_of(spec, param_tree.LAYERS),
      add_experts,
      new_slices,
      source_rows.get(pkey),
      jax.tree_util.keystr(path),
    )

  trees = (opt_state, specs) + ((target,) if target is not None else ())
  out = jax.tree_util.tree_map_with_path(expand, *trees, is_leaf=_is_factored_state)
  if target is not None:
    for (path, leaf), want_leaf in zip(
      jax.tree_util.tree_flatten_with_path(out)[0], jax.tree_util.tree_leaves(target)
    ):
      if tuple(np.shape(leaf)) != tuple(want_leaf.shape):
        raise ExpansionError(
          f"Expanded optimizer state {jax.tree_util.keystr(path)} has shape "
          f"{np.shape(leaf)}, tx.init gives {want_leaf.shape}."
        )
  return out
