"""Expert-expansion surgery: grow every MoE layer from E to E + N experts.

All functions are pure functions over pytrees of (unboxed) arrays plus a params-structured pytree of
logical ``PartitionSpec`` (``LanguageModel.params_logical_axes()``). The expert dimension of a leaf
is the one whose logical name is ``'expert'`` (never a position or a key-name pattern), so
unscanned (``wi [expert, embed, mlp]``) and scanned (``wi [layers, expert, embed, mlp]``)
layouts and the router kernel (``[embed, expert]``) are all handled the same way.

Semantics (docs/lifelong.md has the full discussion):

* old expert slices ``[0, E)`` are copied bit for bit; leaves without an ``expert`` axis are
  returned unchanged (the very same objects);
* ``init="copy"``: new slice ``E + i`` is a copy of a source expert (``i % E`` round-robin, or the
  ``(i % E)``-th most used expert of the layer when usage counts are given) plus Gaussian noise of
  standard deviation ``noise_scale * std(source slice)``; every leaf of one MoE layer (``wi``,
  ``wi_gate``, ``wo``, router column) copies the same source expert, with independent noise;
* ``init="random"``: new slices are taken from a freshly initialised model with E + N experts, i.e.
  drawn from each layer's own initializer;
* ``router_init``: router columns "copy" (as ``init`` makes them), "copy_offset" (copy minus
  ``router_offset * mu / |mu|^2``: on tokens with mean router input ``mu`` the new logit is on
  average ``router_offset`` below the source's), "zero" or "small_random";
* optimizer state: every state leaf that follows an expert param grows along its expert axis with
  zeros (default), its source expert's slice or the mean of the old slices (old slices kept);
  Adafactor's factored statistics are handled, including the case where the growth changes which
  two dimensions Adafactor factors.

Sharded inputs: every computation runs under ``jax.jit`` with ``out_shardings`` equal to the input
leaf's ``NamedSharding`` (same mesh and spec), so sharded ``jax.Array`` params stay sharded and
nothing is gathered onto one host. The grown dimension must stay divisible by the mesh axes it is
sharded over (E + N a multiple of the ``expert`` mesh axis); otherwise an ExpansionError says so.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lifelong_moe_jax import partitioning
from lifelong_moe_jax import param_tree
from lifelong_moe_jax.param_tree import (
  LeafInfo,
  ParamTreeError,
  expert_axis,
  expert_counts,
  flatten_with_axes,
  grown_shape,
  jit_with_shardings,
  moe_layer_rows,
  num_experts_of,
  out_sharding,
  pad_experts,
  path_names,
)
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.models.config import ModelConfig

InitMode = Literal["copy", "random"]
SourceExperts = Literal["round_robin"] | np.ndarray | Sequence[float] | Sequence[Sequence[float]]
# New router columns (see ``expand_params``); "copy" follows ``init`` (today's behaviour).
RouterInit = Literal["copy", "copy_offset", "zero", "small_random"]
ROUTER_INITS = ("copy", "copy_offset", "zero", "small_random")
# Optimizer statistics of new expert slices (see ``expand_opt_state``).
NewSliceState = Literal["zeros", "source", "mean"]
NEW_SLICE_STATES = ("zeros", "source", "mean")


# Surgery cannot be done as asked (bad arguments, inconsistent shapes, unshardable result). The
# param-tree helpers raise the same class.
ExpansionError = ParamTreeError


class AlreadyExpandedError(ExpansionError):
  """The checkpoint was already expanded for this phase; expanding again would add experts twice."""


def expanded_config(config: ModelConfig, add_experts: int) -> ModelConfig:
  """``config`` with ``num_experts + add_experts`` experts (same everything else)."""
  if not config.is_moe:
    raise ExpansionError("Cannot add experts to a dense model (num_experts=0).")
  if add_experts < 0:
    raise ExpansionError(f"add_experts must be >= 0, got {add_experts}.")
  return dataclasses.replace(config, num_experts=config.num_experts + add_experts)


def select_source_experts(usage: Any, add_experts: int) -> np.ndarray:
  """Source expert of every new expert, from usage counts on the new data.

  Args:
    usage: ``[E]`` or ``[M, E]`` (per MoE layer) counts or fractions, e.g.
      ``collect_moe_stats(...)["expert_fraction"]`` measured on the new distribution.
    add_experts: N.
  Returns:
    int ``[N]`` or ``[M, N]``: new expert ``i`` copies the ``(i % E)``-th most used expert of its
    layer (ties go to the lower index).
  """
  usage = np.asarray(usage, np.float64)
  if usage.ndim not in (1, 2) or usage.shape[-1] == 0:
    raise ExpansionError(f"usage must be [E] or [num_moe_layers, E], got shape {usage.shape}.")
  ranking = np.argsort(-usage, axis=-1, kind="stable")
  return np.take(ranking, np.arange(add_experts) % usage.shape[-1], axis=-1).astype(np.int32)


def source_indices(source_experts: Any, num_experts: int, add_experts: int) -> np.ndarray:
  """int ``[N]`` or ``[M, N]``: the expert each new expert copies (``expand_params``' choice for
  ``source_experts``: "round_robin" or usage counts)."""
  return _source_indices(source_experts, num_experts, add_experts)


def _source_indices(source_experts: Any, num_experts: int, add_experts: int) -> np.ndarray:
  """int ``[N]`` or ``[M, N]`` source experts for copy init."""
  if isinstance(source_experts, str):
    if source_experts != "round_robin":
      raise ExpansionError(
        f"source_experts must be 'round_robin' or usage counts, got {source_experts!r}."
      )
    return (np.arange(add_experts) % num_experts).astype(np.int32)
  usage = np.asarray(source_experts)
  if usage.shape[-1] != num_experts:
    raise ExpansionError(
      f"usage counts have {usage.shape[-1]} experts per layer but the params have {num_experts}."
    )
  return select_source_experts(usage, add_experts)


def _path_seed(names: Sequence[str]) -> int:
  return zlib.crc32("/".join(names).encode()) & 0x7FFFFFFF


def _leaf_noise_key(rng: jax.Array, names: Sequence[str]) -> jax.Array:
  """An ``rbg`` key for one leaf's noise, derived from ``rng`` and the leaf's path.

  The noise is drawn with XLA's RngBitGenerator (``rbg``): it is generated shard-locally for
  sharded outputs and compiles much faster than threefry for large shapes. Its values depend on
  the sharding (not on anything else), which is fine for initialisation noise.
  """
  key = jax.random.fold_in(rng, _path_seed(names))
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  data = jnp.ravel(key).astype(jnp.uint32)
  return jax.random.wrap_key_data(jnp.tile(data, 4)[:4], impl="rbg")


# ------------------------------------------------------------------------------- params
def _take_sources(x: jax.Array, ea: int, la: int | None, sources: np.ndarray) -> jax.Array:
  """Slices ``sources`` of ``x`` along ``ea``: ``[N]`` indices, or ``[blocks, N]`` per block of a
  scanned leaf (``la`` its layers axis)."""
  if sources.ndim == 1:
    return jnp.take(x, jnp.asarray(sources), axis=ea)
  shape = [1] * x.ndim
  shape[la], shape[ea] = sources.shape
  return jnp.take_along_axis(x, jnp.asarray(sources).reshape(shape), axis=ea)


def _copy_new_slices(
  x: jax.Array, info: LeafInfo, sources: np.ndarray, rng: jax.Array, noise_scale: float
) -> jax.Array:
  """New slices ``[.., N, ..]``: source slices plus ``noise_scale * std(source slice)`` noise."""
  ea, la = info.expert_axis, info.layers_axis
  src = _take_sources(x, ea, la, sources)
  if noise_scale == 0:
    return src
  reduce = tuple(d for d in range(x.ndim) if d not in (ea, la))
  srcf = src.astype(jnp.float32)
  std = jnp.std(srcf, axis=reduce, keepdims=True) if reduce else jnp.zeros_like(srcf)
  noise = jax.random.normal(rng, src.shape, jnp.float32)
  return (srcf + noise_scale * std * noise).astype(x.dtype)


def is_router_leaf(info: LeafInfo) -> bool:
  """Whether a leaf is a router kernel: logical axes ``('embed', 'expert')`` (plus ``layers``)."""
  if info.spec is None or info.expert_axis is None:
    return False
  names = set()
  for entry in info.spec:
    if entry is not None:
      names.update(entry if isinstance(entry, (tuple, list)) else (entry,))
  return names - {"layers"} == {"embed", "expert"}


def router_offsets(router_input_mean: Any, offset: float) -> np.ndarray:
  """``offset * mu / |mu|^2`` per MoE layer, float32 ``[M, embed]`` (``mu``: ``[embed]`` or
  ``[M, embed]``): subtracted from a copied router column, it lowers the column's logit by
  ``offset`` on average over the tokens whose mean router input is ``mu``."""
  mu = np.asarray(router_input_mean, np.float64)
  if mu.ndim == 1:
    mu = mu[None]
  if mu.ndim != 2:
    raise ExpansionError(
      f"router_input_mean must be [embed] or [num_moe_layers, embed], got shape {mu.shape}."
    )
  norm2 = np.sum(mu * mu, axis=-1, keepdims=True)
  if not np.all(np.isfinite(norm2)) or np.any(norm2 <= 0):
    raise ExpansionError(
      "router_input_mean has a zero or non-finite row; measure it on real tokens of the new data."
    )
  return (offset * mu / norm2).astype(np.float32)


def _new_router_columns(
  x: jax.Array,
  info: LeafInfo,
  copied: jax.Array | None,
  router_init: str,
  offset_row: np.ndarray | None,
  rng: jax.Array,
  noise_scale: float,
  add: int,
) -> jax.Array:
  """The ``add`` new router columns ``[.., N]`` for ``router_init`` other than "copy".

  ``copied``: the copy-mode columns (source + noise), needed by "copy_offset"; ``offset_row``:
  ``offset * mu / |mu|^2`` of the leaf's layer (``[embed]``, or ``[blocks, embed]`` scanned).
  """
  ea, la = info.expert_axis, info.layers_axis
  shape = list(x.shape)
  shape[ea] = add
  shape = tuple(shape)
  if router_init == "zero":
    return jnp.zeros(shape, x.dtype)
  if router_init == "small_random":
    # N(0, (noise_scale * std of the layer's old columns)^2), independently per entry.
    reduce = tuple(d for d in range(x.ndim) if d != la)
    std = jnp.std(x.astype(jnp.float32), axis=reduce, keepdims=True)
    noise = jax.random.normal(rng, shape, jnp.float32)
    return (noise_scale * std * noise).astype(x.dtype)
  # copy_offset: the copied column minus the offset direction of its layer.
  embed_axis = [d for d in range(x.ndim) if d not in (ea, la)][0]
  off_shape = [1] * x.ndim
  off_shape[embed_axis] = x.shape[embed_axis]
  if la is not None:
    off_shape[la] = x.shape[la]
  off = jnp.asarray(offset_row, jnp.float32).reshape(off_shape)
  return (copied.astype(jnp.float32) - off).astype(x.dtype)


def _random_init_fn(model_for_random_init: Any, total_experts: int) -> Callable[[jax.Array], Any]:
  """``rng -> unboxed params`` of a model with ``total_experts`` experts."""
  # Imported here: models.lm imports the whole decoder, surgery itself only needs the config.
  from lifelong_moe_jax.models.lm import LanguageModel  # pylint: disable=import-outside-toplevel

  if isinstance(model_for_random_init, LanguageModel):
    got = model_for_random_init.config.num_experts
    if got != total_experts:
      raise ExpansionError(
        f"model_for_random_init has {got} experts; it must be the expanded "
        f"model with {total_experts} (expanded_config(config, add_experts))."
      )
    return lambda rng: nn.unbox(model_for_random_init.init(rng))
  if callable(model_for_random_init):
    return lambda rng: nn.unbox(model_for_random_init(rng))
  raise ExpansionError(
    "init='random' needs model_for_random_init: the expanded LanguageModel "
    "(LanguageModel(expanded_config(config, add_experts))) or an rng -> params "
    "function."
  )


def expand_params(
  params: Any,
  params_axes: Any,
  add_experts: int,
  *,
  init: InitMode = "copy",
  rng: jax.Array,
  noise_scale: float = 0.01,
  source_experts: SourceExperts = "round_robin",
  model_for_random_init: Any = None,
  router_init: RouterInit = "copy",
  router_offset: float = 1.0,
  router_input_mean: Any = None,
) -> Any:
  """Grows every leaf with an ``expert`` axis from E to E + N along that axis.

  Args:
    params: unboxed params pytree (numpy arrays or, possibly sharded, ``jax.Array``).
    params_axes: params-structured pytree of logical ``PartitionSpec``.
    add_experts: N >= 0 (0 returns ``params`` unchanged).
    init: ``"copy"`` or ``"random"`` (see the module docstring).
    rng: PRNG key for the copy noise or for the fresh initialisation.
    noise_scale: copy mode: noise std relative to the std of the copied slice (0 = exact copies).
    source_experts: copy mode: ``"round_robin"`` (new expert i copies expert i % E) or usage counts
      ``[E]`` / ``[num_moe_layers, E]`` on the new data (new expert i copies the (i % E)-th most
      used expert of its layer; see ``select_source_experts``).
    model_for_random_init: random mode: the expanded ``LanguageModel`` (E + N experts) or a function
      ``rng -> params`` of the expanded model; only its new expert slices are used.
    router_init: new router columns (router kernels: the leaves with logical axes
      ``('embed', 'expert')``): ``"copy"`` (as ``init`` makes them: source column + noise, or the
      router initializer), ``"copy_offset"`` (copy mode only: source column + noise
      ``- router_offset * mu / |mu|^2``, so that on tokens whose mean router input is ``mu`` the new
      column's logit is on average ``router_offset`` below its source's), ``"zero"`` (zero columns)
      or ``"small_random"`` (``N(0, (noise_scale * std(layer's old kernel))^2)`` entries).
    router_offset: copy_offset: the mean logit gap (>= 0).
    router_input_mean: copy_offset: ``mu``, the mean router input ``[embed]`` or
      ``[num_moe_layers, embed]`` on the new data (``router_probe``), measured with the old model.
  Returns:
    The expanded params: same structure; expert leaves ``[.., E + N, ..]`` whose first E slices are
    bit-identical to the input; other leaves are the input objects.
  """
  if add_experts < 0:
    raise ExpansionError(f"add_experts must be >= 0, got {add_experts}.")
  if init not in ("copy", "random"):
    raise ExpansionError(f"init must be 'copy' or 'random', got {init!r}.")
  if noise_scale < 0:
    raise ExpansionError(f"noise_scale must be >= 0, got {noise_scale}.")
  if router_init not in ROUTER_INITS:
    raise ExpansionError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}.")
  if router_init == "copy_offset":
    if init != "copy":
      raise ExpansionError(
        "router_init='copy_offset' offsets a copied column: it needs init='copy'."
      )
    if router_input_mean is None:
      raise ExpansionError(
        "router_init='copy_offset' needs router_input_mean (the mean router "
        "input on the new data, per MoE layer)."
      )
    if router_offset < 0:
      raise ExpansionError(f"router_offset must be >= 0, got {router_offset}.")
  if add_experts == 0:
    return params
  treedef, infos = flatten_with_axes(params, params_axes)
  num_experts = num_experts_of(params, params_axes)
  experts = [i for i in infos if i.expert_axis is not None]
  shardings = {
    i.key: out_sharding(i.value, grown_shape(np.shape(i.value), i.expert_axis, add_experts), i.key)
    for i in experts
  }
  if all(s is None for s in shardings.values()):
    shardings = None
  elif any(s is None for s in shardings.values()):
    device = jax.devices()[0]
    shardings = {k: s or jax.sharding.SingleDeviceSharding(device) for k, s in shardings.items()}

  if init == "copy":
    sources = _source_indices(source_experts, num_experts, add_experts)
    if sources.ndim == 1:  # the same sources for every layer and block.
      rows = {i.key: sources for i in experts}
    else:
      rows = moe_layer_rows(infos, sources, "source_experts")
    offsets = {}
    if router_init == "copy_offset":
      offsets = moe_layer_rows(
        infos, router_offsets(router_input_mean, router_offset), "router_input_mean"
      )

    def grow(leaves, key):
      out = {}
      for info in experts:
        x = leaves[info.key]
        leaf_key = _leaf_noise_key(key, info.names)
        new = None
        if router_init == "copy" or router_init == "copy_offset" or not is_router_leaf(info):
          new = _copy_new_slices(x, info, rows[info.key], leaf_key, noise_scale)
        if router_init != "copy" and is_router_leaf(info):
          new = _new_router_columns(
            x, info, new, router_init, offsets.get(info.key), leaf_key, noise_scale, add_experts
          )
        out[info.key] = jnp.concatenate([x, new], axis=info.expert_axis)
      return out
  else:
    init_fn = _random_init_fn(model_for_random_init, num_experts + add_experts)

    def grow(leaves, key):
      fresh = {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(init_fn(key))[0]}
      out = {}
      for info in experts:
        x = leaves[info.key]
        want = grown_shape(x.shape, info.expert_axis, add_experts)
        f = fresh.get(info.names)
        if f is None or tuple(f.shape) != want:
          raise ExpansionError(
            f"The fresh model has no param {info.key} of shape {want} (got "
            f"{None if f is None else tuple(f.shape)}): model_for_random_init must be the same "
            "architecture with E + N experts."
          )
        new = jax.lax.slice_in_dim(f, num_experts, num_experts + add_experts, axis=info.expert_axis)
        if router_init != "copy" and is_router_leaf(info):
          new = _new_router_columns(
            x,
            info,
            None,
            router_init,
            None,
            _leaf_noise_key(key, info.names),
            noise_scale,
            add_experts,
          )
        out[info.key] = jnp.concatenate([x, new.astype(x.dtype)], axis=info.expert_axis)
      return out

  grown = jit_with_shardings(grow, shardings)({i.key: i.value for i in experts}, rng)
  leaves = [grown[i.key] if i.expert_axis is not None else i.value for i in infos]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def expanded_abstract_params(params: Any, params_axes: Any, add_experts: int) -> Any:
  """``jax.ShapeDtypeStruct`` params of the expanded model (nothing is computed)."""
  treedef, infos = flatten_with_axes(params, params_axes)
  leaves = []
  for i in infos:
    shape = tuple(np.shape(i.value))
    if i.expert_axis is not None:
      shape = grown_shape(shape, i.expert_axis, add_experts)
    leaves.append(
      jax.ShapeDtypeStruct(shape, getattr(i.value, "dtype", None) or np.asarray(i.value).dtype)
    )
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------- optimizer state
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
  return _take_sources(x, axis, layers_axis, rows)


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
      _source_indices(source_experts, record.num_experts, add_experts)
    ).tolist()
  if add_experts and router_init != "copy":
    extra["router_init"] = router_init
    if router_init == "copy_offset":
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
