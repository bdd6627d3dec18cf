"""Params pytrees with logical axes: key paths, the expert and layers dimensions, expert slices.

The helpers every tool that edits params shares (checkpoint surgery, freezing masks, penalties,
partitioning, checkpoint shape checks). A leaf's expert dimension is the one whose logical name is
``'expert'`` (``LanguageModel.params_logical_axes()``), never a position or a key-name pattern, so
unscanned (``wi [expert, embed, mlp]``), scanned (``wi [layers, expert, embed, mlp]``) layouts and
the router kernel (``[embed, expert]``) are handled alike.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

EXPERT = "expert"
LAYERS = "layers"

_UNSCANNED_LAYER = re.compile(r"layers_(\d+)")


class ParamTreeError(ValueError):
  """A params tree and its logical axes do not fit together (or an expert edit is impossible)."""


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """Key path -> tuple of plain names (dict keys, attribute names, sequence indices)."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return tuple(names)


def path_str(path: Sequence[Any]) -> str:
  """Key path -> ``"a/b/c"``."""
  return "/".join(path_names(path))


def axis_of(spec: P | None, name: str) -> int | None:
  """Index of the dimension whose logical name is (or includes) ``name``; None when absent."""
  if spec is None:
    return None
  found = [
    i
    for i, entry in enumerate(spec)
    if entry == name or (isinstance(entry, (tuple, list)) and name in entry)
  ]
  if len(found) > 1:
    raise ParamTreeError(f"Logical axis {name!r} appears in more than one dimension of {spec}.")
  return found[0] if found else None


def expert_axis(spec: P | None) -> int | None:
  """Dimension of a param with logical name ``'expert'`` (None for non-expert params)."""
  return axis_of(spec, EXPERT)


@dataclasses.dataclass(frozen=True)
class LeafInfo:
  """One param leaf with its logical axes."""

  path: tuple[Any, ...]
  names: tuple[str, ...]
  value: Any
  spec: P | None
  expert_axis: int | None
  layers_axis: int | None

  @property
  def key(self) -> str:
    return "/".join(self.names)


def flatten_with_axes(params: Any, params_axes: Any) -> tuple[Any, list[LeafInfo]]:
  """Flattens params with their logical specs.

  Returns:
    (treedef of params, [LeafInfo] in leaf order).
  Raises:
    TypeError for boxed (``nn.LogicallyPartitioned``) params; ParamTreeError when the axes tree
    does not match the params tree.
  """
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  if any(is_box(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_box)):
    raise TypeError(
      "Params are boxed (flax LogicallyPartitioned); pass nn.unbox(params) and the "
      "axes from LanguageModel.params_logical_axes()."
    )
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    specs = treedef.flatten_up_to(params_axes)
  except (ValueError, TypeError) as e:
    raise ParamTreeError(f"params_axes does not have the structure of params: {e}") from e
  infos = []
  for (path, leaf), spec in zip(flat, specs):
    spec = spec if isinstance(spec, P) or spec is None else P(*spec)
    ndim = np.ndim(leaf) if not hasattr(leaf, "ndim") else leaf.ndim
    if spec is not None and len(spec) > ndim:
      raise ParamTreeError(
        f"{jax.tree_util.keystr(path)}: spec {spec} has more entries than the "
        f"leaf has dimensions ({ndim})."
      )
    infos.append(
      LeafInfo(path, path_names(path), leaf, spec, expert_axis(spec), axis_of(spec, LAYERS))
    )
  return treedef, infos


def expert_counts(params: Any, params_axes: Any) -> dict[str, int]:
  """``{'a/b/wi': E}`` for every leaf with an ``expert`` axis."""
  _, infos = flatten_with_axes(params, params_axes)
  return {i.key: int(np.shape(i.value)[i.expert_axis]) for i in infos if i.expert_axis is not None}


def num_experts_of(params: Any, params_axes: Any) -> int:
  """The common expert count of all expert leaves; raises ParamTreeError if none or they differ."""
  counts = expert_counts(params, params_axes)
  if not counts:
    raise ParamTreeError(
      "No parameter has a logical 'expert' axis: is this an MoE model, and were "
      "the axes taken from LanguageModel.params_logical_axes()?"
    )
  values = set(counts.values())
  if len(values) != 1:
    raise ParamTreeError(f"Expert leaves disagree on the number of experts: {counts}.")
  return values.pop()


# ------------------------------------------------------------------------------- MoE layers
def moe_layer_rows(
  infos: Sequence[LeafInfo], values: np.ndarray, what: str
) -> dict[str, np.ndarray]:
  """Distributes per-MoE-layer values ``[M, ...]`` over the expert leaves.

  MoE layers are ordered as ``lm.collect_moe_stats`` orders them: unscanned leaves belong to the
  layer ``layers_{i}`` in their path (ranked by ``i`` among the MoE layers); a scanned leaf (with a
  ``layers`` axis) takes all M rows, one per scanned block. A single row (M == 1) applies to every
  layer.

  Returns:
    ``{leaf key: rows}`` with rows ``[...]`` for unscanned leaves and ``[M, ...]`` for scanned ones.
  """
  expert_infos = [i for i in infos if i.expert_axis is not None]
  numbers = {}
  for info in expert_infos:
    layer = [int(m.group(1)) for n in info.names if (m := _UNSCANNED_LAYER.fullmatch(n))]
    numbers[info.key] = layer[-1] if layer else None
  ranks = {n: r for r, n in enumerate(sorted({n for n in numbers.values() if n is not None}))}
  rows = {}
  m = values.shape[0]
  for info in expert_infos:
    if info.layers_axis is not None:
      size = np.shape(info.value)[info.layers_axis]
      if m not in (1, size):
        raise ParamTreeError(
          f"{what} has {m} rows but {info.key} is scanned over {size} blocks "
          "(one MoE layer per block): give one row per MoE layer."
        )
      rows[info.key] = values if m == size else np.repeat(values, size, axis=0)
    elif m == 1:
      rows[info.key] = values[0]
    elif numbers[info.key] is None:
      raise ParamTreeError(
        f"{what} has {m} rows (one per MoE layer) but {info.key} belongs to no "
        "layers_<i> and has no 'layers' axis, so its layer is unknown."
      )
    else:
      if len(ranks) != m:
        raise ParamTreeError(f"{what} has {m} rows but the params hold {len(ranks)} MoE layers.")
      rows[info.key] = values[ranks[numbers[info.key]]]
  return rows


# ------------------------------------------------------------------------------- expert slices
def out_sharding(value: Any, new_shape: tuple[int, ...], key: str) -> Any:
  """The input leaf's sharding, applied to the grown shape; None for host (numpy) values."""
  sharding = getattr(value, "sharding", None)
  if sharding is None:
    return None
  if isinstance(sharding, NamedSharding):
    for dim, entry in enumerate(sharding.spec):
      if entry is None:
        continue
      axes = entry if isinstance(entry, (tuple, list)) else (entry,)
      size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if new_shape[dim] % size:
        raise ParamTreeError(
          f"{key}: grown dimension {dim} has size {new_shape[dim]}, not divisible by mesh axes "
          f"{axes} (size {size}) it is sharded over. Choose add_experts so that the new expert "
          f"count is a multiple of {size}."
        )
    return NamedSharding(sharding.mesh, sharding.spec)
  return sharding


def jit_with_shardings(fn: Callable, out_shardings: Any) -> Callable:
  return jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)


def grown_shape(shape: Sequence[int], axis: int, add: int) -> tuple[int, ...]:
  shape = list(shape)
  shape[axis] += add
  return tuple(shape)


@functools.lru_cache(maxsize=None)
def _pad_fn(axis: int, add: int, sharding: Any) -> Callable:
  """Jitted ``x -> concat([x, zeros])`` along ``axis`` (cached per axis/size/sharding)."""

  def pad(x):
    return jnp.pad(x, [(0, add if d == axis else 0) for d in range(x.ndim)])

  return jit_with_shardings(pad, sharding)


def pad_experts(value: Any, axis: int, add: int, key: str = "leaf") -> jax.Array:
  """``value`` grown by ``add`` zero slices along ``axis``, sharded like ``value``."""
  new_shape = grown_shape(np.shape(value), axis, add)
  return _pad_fn(axis, add, out_sharding(value, new_shape, key))(value)
