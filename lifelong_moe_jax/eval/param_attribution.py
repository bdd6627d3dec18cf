"""Which params carry the forgetting? Groups of a trained model's params put back to an earlier
checkpoint's values.

After a lifelong phase the model differs from the previous phase's checkpoint in its shared params
(embeddings, attention, dense MLPs, norms, output layer), in the old experts and router columns
(unless frozen) and in the added experts. Evaluating the trained model with one group restored to
the earlier values at a time tells which group moved the old distributions' perplexity (and which
the new distribution's learning lives in). ``restore_groups`` is the pure function behind
``benchmarks/forgetting_attribution.py``.

Groups (``PARAM_GROUPS``), from a leaf's key path and logical axes (``param_tree``):

* ``embed``: the input embedding table;
* ``logits``: the output projection (untied embeddings);
* ``attention``: every attention projection;
* ``dense_mlp``: the MLPs of the dense (non-MoE) layers;
* ``norms``: every layer-norm scale;
* ``old_experts``: the slices ``[0, E_ref)`` of every leaf with a logical ``'expert'`` axis
  (expert weights and router kernel columns), ``E_ref`` being the earlier checkpoint's expert
  count; the added experts ``[E_ref, E)`` always keep their trained values (the earlier model has
  none to restore).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from lifelong_moe_jax.param_tree import LeafInfo, ParamTreeError, flatten_with_axes

SHARED_GROUPS = ("embed", "logits", "attention", "dense_mlp", "norms")
PARAM_GROUPS = SHARED_GROUPS + ("old_experts",)


def param_group(info: LeafInfo) -> str:
  """The group of one leaf (one of ``PARAM_GROUPS``).

  Raises:
    ParamTreeError for a leaf that fits no group (a model this grouping does not know).
  """
  if info.expert_axis is not None:
    return "old_experts"
  names = info.names
  if any("norm" in n for n in names):
    return "norms"
  if "attention" in names:
    return "attention"
  if names[0] == "embed":
    return "embed"
  if names[0] == "logits":
    return "logits"
  if "mlp" in names:
    return "dense_mlp"
  raise ParamTreeError(f"{info.key}: no param group of {PARAM_GROUPS} fits this leaf.")


def group_sizes(params: Any, params_axes: Any) -> dict[str, int]:
  """``{group: number of entries}`` (``old_experts`` counts every expert slice)."""
  _, infos = flatten_with_axes(params, params_axes)
  sizes = dict.fromkeys(PARAM_GROUPS, 0)
  for info in infos:
    sizes[param_group(info)] += int(np.prod(np.shape(info.value)))
  return sizes


def check_compatible(params: Any, reference: Any, params_axes: Any) -> None:
  """Raises ParamTreeError unless ``reference`` has the structure of ``params`` with equal shapes,
  except for at most as many experts along every ``'expert'`` axis."""
  treedef, infos = flatten_with_axes(params, params_axes)
  ref_leaves, ref_treedef = jax.tree_util.tree_flatten(reference)
  if ref_treedef != treedef:
    raise ParamTreeError(
      "The reference checkpoint's params do not have the structure of the checkpoint's (a "
      "different architecture?): pass an earlier checkpoint of the same lifelong run."
    )
  for info, ref in zip(infos, ref_leaves):
    shape, ref_shape = list(np.shape(info.value)), list(np.shape(ref))
    if info.expert_axis is not None and len(shape) == len(ref_shape):
      if ref_shape[info.expert_axis] > shape[info.expert_axis]:
        raise ParamTreeError(
          f"{info.key}: the reference has {ref_shape[info.expert_axis]} experts, the checkpoint "
          f"only {shape[info.expert_axis]}: pass the earlier checkpoint as the reference."
        )
      shape[info.expert_axis] = ref_shape[info.expert_axis] = 0
    if shape != ref_shape:
      raise ParamTreeError(
        f"{info.key}: shape {np.shape(info.value)} in the checkpoint, {np.shape(ref)} in the "
        "reference: the two are not checkpoints of the same model."
      )


def restore_groups(params: Any, reference: Any, params_axes: Any, groups: Sequence[str]) -> Any:
  """``params`` with the leaves of ``groups`` set to ``reference``'s values.

  Args:
    params: unboxed params of the trained model (host or device arrays), ``E`` experts.
    reference: unboxed params of the earlier checkpoint, same structure, ``E_ref <= E`` experts.
    params_axes: params-structured logical ``PartitionSpec`` tree of ``params``.
    groups: names from ``PARAM_GROUPS``.
  Returns:
    params-structured tree of numpy arrays: a restored non-expert leaf is the reference's leaf;
    a restored expert leaf ``[.., E, ..]`` has the reference's slices in ``[0, E_ref)`` and the
    trained ones in ``[E_ref, E)``; other leaves are ``params``' own.
  """
  unknown = sorted(set(groups) - set(PARAM_GROUPS))
  if unknown:
    raise ValueError(f"Unknown param groups {unknown}; the groups are {PARAM_GROUPS}.")
  check_compatible(params, reference, params_axes)
  treedef, infos = flatten_with_axes(params, params_axes)
  out = []
  for info, ref in zip(infos, jax.tree_util.tree_leaves(reference)):
    value = np.asarray(info.value)
    if param_group(info) not in groups:
      out.append(value)
    elif info.expert_axis is None:
      out.append(np.asarray(ref, value.dtype))
    else:
      value = value.copy()
      index = [slice(None)] * value.ndim
      index[info.expert_axis] = slice(0, np.shape(ref)[info.expert_axis])
      value[tuple(index)] = np.asarray(ref, value.dtype)
      out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out)
