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
  average ``router_offset`` below the source's), "copy_contrast" (copy plus a given shift per MoE
  layer: ``router_contrast.contrast_shift``, ahead of the source on the new data and behind it on
  the old), "zero" or "small_random";
* optimizer state (``opt_state_expansion.expand_opt_state``): every state leaf that follows an
  expert param grows along its expert axis with zeros (default), its source expert's slice or the
  mean of the old slices (old slices kept); Adafactor's factored statistics are handled, including
  the case where the growth changes which two dimensions Adafactor factors.

``phase_expansion`` holds the checked, phase-level entry point (``expand_for_phase``: validation and
idempotency against the phase record).

Sharded inputs: every computation runs under ``jax.jit`` with ``out_shardings`` equal to the input
leaf's ``NamedSharding`` (same mesh and spec), so sharded ``jax.Array`` params stay sharded and
nothing is gathered onto one host. The grown dimension must stay divisible by the mesh axes it is
sharded over (E + N a multiple of the ``expert`` mesh axis); otherwise an ExpansionError says so.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lifelong_moe_jax.param_tree import (
  LeafInfo,
  ParamTreeError,
  flatten_with_axes,
  grown_shape,
  jit_with_shardings,
  moe_layer_rows,
  num_experts_of,
  out_sharding,
  path_names,
)
from lifelong_moe_jax.models.config import ModelConfig

InitMode = Literal["copy", "random"]
SourceExperts = Literal["round_robin"] | np.ndarray | Sequence[float] | Sequence[Sequence[float]]
# New router columns (see ``expand_params``); "copy" follows ``init`` (today's behaviour).
RouterInit = Literal["copy", "copy_offset", "copy_contrast", "zero", "small_random"]
ROUTER_INITS = ("copy", "copy_offset", "copy_contrast", "zero", "small_random")
# The options that shift a copied column (copy init only).
COPIED_ROUTER_INITS = ("copy_offset", "copy_contrast")
# Optimizer statistics of new expert slices (see ``opt_state_expansion.expand_opt_state``).
NewSliceState = Literal["zeros", "source", "mean"]
NEW_SLICE_STATES = ("zeros", "source", "mean")


# Surgery cannot be done as asked (bad arguments, inconsistent shapes, unshardable result). The
# param-tree helpers raise the same class.
ExpansionError = ParamTreeError


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
def take_sources(x: jax.Array, ea: int, la: int | None, sources: np.ndarray) -> jax.Array:
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
  src = take_sources(x, ea, la, sources)
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

  ``copied``: the copy-mode columns (source + noise), needed by "copy_offset" / "copy_contrast";
  ``offset_row``: what is subtracted from them in the leaf's layer (``[embed]``, or
  ``[blocks, embed]`` scanned): ``offset * mu / |mu|^2``, or minus the contrast shift.
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
  # copy_offset / copy_contrast: the copied column minus the offset row of its layer.
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
  router_column_shift: Any = None,
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
      column's logit is on average ``router_offset`` below its source's), ``"copy_contrast"`` (copy
      mode only: source column + noise + ``router_column_shift``), ``"zero"`` (zero columns)
      or ``"small_random"`` (``N(0, (noise_scale * std(layer's old kernel))^2)`` entries).
    router_offset: copy_offset: the mean logit gap (>= 0).
    router_input_mean: copy_offset: ``mu``, the mean router input ``[embed]`` or
      ``[num_moe_layers, embed]`` on the new data (``router_probe``), measured with the old model.
    router_column_shift: copy_contrast: ``[embed]`` or ``[num_moe_layers, embed]`` added to the
      copied columns (``router_contrast.contrast_shift``).
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
  if router_init in COPIED_ROUTER_INITS and init != "copy":
    raise ExpansionError(
      f"router_init={router_init!r} shifts a copied column: it needs init='copy'."
    )
  if router_init == "copy_contrast" and router_column_shift is None:
    raise ExpansionError(
      "router_init='copy_contrast' needs router_column_shift (router_contrast.contrast_shift of "
      "the new and old router-input moments, per MoE layer)."
    )
  if router_init == "copy_offset":
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
    elif router_init == "copy_contrast":
      shift = np.asarray(router_column_shift, np.float32)
      shift = shift[None] if shift.ndim == 1 else shift
      if shift.ndim != 2 or not np.all(np.isfinite(shift)):
        raise ExpansionError(
          f"router_column_shift must be finite [embed] or [num_moe_layers, embed], got shape "
          f"{shift.shape}."
        )
      offsets = moe_layer_rows(infos, -shift, "router_column_shift")

    def grow(leaves, key):
      out = {}
      for info in experts:
        x = leaves[info.key]
        leaf_key = _leaf_noise_key(key, info.names)
        new = None
        if router_init == "copy" or router_init in COPIED_ROUTER_INITS or not is_router_leaf(info):
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
