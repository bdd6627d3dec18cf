"""Device mesh, logical-axis rules and shardings for params, optimizer state and batches.

Mesh axes are ``('data', 'expert', 'model')``. Logical axis names on params and activations are
mapped to mesh axes by ``DEFAULT_RULES``:

====================  =====================  ==================================================
logical               mesh                   used by
====================  =====================  ==================================================
batch                 ('data', 'expert')     activations, token groups, input batches
expert                'expert'               stacked expert weights, router columns
expert_group          'data'                 token groups after the all-to-all
mlp, heads            'model'                feed-forward hidden units, attention heads
embed, vocab, kv,     replicated
length, layers, ...
====================  =====================  ==================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lifelong_moe_jax import param_tree

MESH_AXES = ("data", "expert", "model")
LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_RULES: LogicalRules = (
  ("batch", ("data", "expert")),
  ("expert", "expert"),
  ("expert_group", "data"),
  ("mlp", "model"),
  ("heads", "model"),
  ("vocab", None),
  ("embed", None),
  ("kv", None),
  ("length", None),
  ("layers", None),
  ("expert_capacity", None),
  ("unmodeled", None),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes. ``data=-1`` takes all devices left after ``expert * model``.

  ``data``, ``expert`` and ``model`` are the total axis sizes. For multi-slice TPU or multi-node
  GPU runs, ``dcn_data`` / ``dcn_expert`` / ``dcn_model`` say how many slices (or nodes: the
  "granules" joined by the slow data-centre network) each axis spans; the rest of the axis stays
  inside a granule on the fast interconnect (ICI / NVLink). Their product must equal the number of
  granules (distinct ``slice_index`` of the devices, else processes), and each total must be a
  multiple of its DCN size. Keep ``dcn_expert = dcn_model = 1`` so the all-to-all of the expert
  axis and the model-parallel collectives never cross DCN, and span slices with ``dcn_data``.
  The mesh is then built by ``jax.experimental.mesh_utils.create_hybrid_device_mesh``.
  """

  data: int = -1
  expert: int = 1
  model: int = 1
  dcn_data: int = 1
  dcn_expert: int = 1
  dcn_model: int = 1

  @property
  def dcn_shape(self) -> tuple[int, int, int]:
    return self.dcn_data, self.dcn_expert, self.dcn_model

  @property
  def is_hybrid(self) -> bool:
    return any(d != 1 for d in self.dcn_shape)

  def ici_shape(self, num_devices: int) -> tuple[int, int, int]:
    """Per-granule (ICI) axis sizes: total sizes divided by the DCN sizes.

    Raises:
      ValueError: a DCN size below 1 or not dividing its axis (naming the axis and the numbers).
    """
    totals = self.resolve(num_devices)
    ici = []
    for name, total, dcn in zip(MESH_AXES, totals, self.dcn_shape):
      if dcn < 1:
        raise ValueError(f"MeshConfig.dcn_{name} must be >= 1, got {dcn}.")
      if total % dcn:
        raise ValueError(
          f"Mesh axis '{name}' has {total} devices, which cannot span MeshConfig.dcn_{name}="
          f"{dcn} slices/nodes: {total} is not a multiple of {dcn}. Choose dcn_{name} dividing "
          f"{total} (or MeshConfig.{name} a multiple of {dcn})."
        )
      ici.append(total // dcn)
    return tuple(ici)

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """(data, expert, model) sizes; raises ValueError if they do not multiply to the devices."""
    for name in ("expert", "model"):
      if getattr(self, name) < 1:
        raise ValueError(f"MeshConfig.{name} must be >= 1, got {getattr(self, name)}.")
    data = self.data
    if data == -1:
      if num_devices % (self.expert * self.model):
        raise ValueError(
          f"{num_devices} devices cannot be split into expert={self.expert} x model={self.model}: "
          f"choose MeshConfig.expert and MeshConfig.model whose product divides {num_devices}."
        )
      data = num_devices // (self.expert * self.model)
    if data * self.expert * self.model != num_devices:
      raise ValueError(
        f"Mesh data={data} x expert={self.expert} x model={self.model} = "
        f"{data * self.expert * self.model} devices, but {num_devices} are available. Set "
        f"MeshConfig.data/expert/model so their product is {num_devices} (data=-1 infers it)."
      )
    return data, self.expert, self.model


def _granule_key(device: Any) -> tuple[str, int]:
  """The DCN granule of a device: its slice (multi-slice TPU) or else its process (node)."""
  slice_index = getattr(device, "slice_index", None)
  if slice_index is not None:
    return "slice", int(slice_index)
  return "process", int(device.process_index)


def hybrid_device_array(mesh_config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
  """The ``[data, expert, model]`` device array of a hybrid (ICI x DCN) mesh.

  Granules are the devices' slices (``slice_index``) or, where devices have none (GPUs, CPUs),
  their processes. Within a granule the axes have the ICI sizes (``MeshConfig.ici_shape``); the
  granules are laid out along the DCN sizes, so axis ``a`` of the result holds
  ``dcn_a`` blocks of ``ici_a`` devices, each block inside one granule.

  Raises:
    ValueError: DCN sizes that do not divide the axes, or whose product is not the number of
      granules, or granules of unequal size (each message names the axes and the numbers).
  """
  devices = list(devices)
  ici = mesh_config.ici_shape(len(devices))
  dcn = mesh_config.dcn_shape
  kinds = {_granule_key(d)[0] for d in devices}
  kind = "slice" if kinds == {"slice"} else "process"
  granules: dict[int, list[Any]] = {}
  for d in devices:
    key = _granule_key(d)[1] if kind == "slice" else int(d.process_index)
    granules.setdefault(key, []).append(d)
  if int(np.prod(dcn)) != len(granules):
    raise ValueError(
      f"MeshConfig dcn_data={dcn[0]} x dcn_expert={dcn[1]} x dcn_model={dcn[2]} = "
      f"{int(np.prod(dcn))} granules, but the {len(devices)} devices form {len(granules)} "
      f"{kind}s. Set the dcn_* sizes so their product is {len(granules)}."
    )
  sizes = sorted({len(g) for g in granules.values()})
  if sizes != [int(np.prod(ici))]:
    raise ValueError(
      f"Each {kind} must hold data={ici[0]} x expert={ici[1]} x model={ici[2]} = "
      f"{int(np.prod(ici))} devices (the ICI mesh), but they hold {sizes}."
    )
  try:
    return jax.experimental.mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=kind == "process"
    )
  except Exception:  # pylint: disable=broad-except - fake CPU devices have no topology.
    blocks = [np.asarray(granules[k]).reshape(ici) for k in sorted(granules)]
    grid = np.empty(dcn, dtype=object)
    for i, index in enumerate(np.ndindex(*dcn)):
      grid[index] = blocks[i]
    return np.block(grid.tolist())


def create_mesh(
  mesh_config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ``('data', 'expert', 'model')`` mesh over ``devices`` (default: all devices).

  With DCN sizes (``MeshConfig.dcn_*``) the mesh is hybrid (``hybrid_device_array``).
  """
  mesh_config = mesh_config or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  if mesh_config.is_hybrid:
    return Mesh(hybrid_device_array(mesh_config, devices), MESH_AXES)
  shape = mesh_config.resolve(len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except - fake CPU devices have no topology.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def validate_model_for_mesh(config: Any, mesh: Mesh) -> None:
  """Raises ValueError when model dimensions cannot be split over the mesh."""
  expert, model = mesh.shape["expert"], mesh.shape["model"]
  if config.is_moe and config.num_experts % expert:
    raise ValueError(
      f"num_experts={config.num_experts} is not divisible by the expert mesh axis ({expert}): "
      f"use a multiple of {expert} experts or set MeshConfig.expert to a divisor of "
      f"{config.num_experts}."
    )
  if not config.is_moe and expert > 1:
    raise ValueError(
      f"A dense model (num_experts=0) cannot use an expert mesh axis of {expert}; "
      "set MeshConfig.expert = 1."
    )
  for name, size in (
    ("num_heads", config.num_heads),
    ("mlp_dim", config.mlp_dim),
    ("expert_mlp_dim", config.expert_hidden_dim),
  ):
    if size % model:
      raise ValueError(
        f"ModelConfig.{name}={size} is not divisible by the model mesh axis "
        f"({model}); choose MeshConfig.model dividing it."
      )


def validate_batch_for_mesh(batch_size: int, mesh: Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["expert"]
  if batch_size % shards:
    raise ValueError(
      f"Global batch size {batch_size} is not divisible by data x expert = {shards} "
      f"batch shards; use a multiple of {shards}."
    )


class Partitioner:
  """Turns logical axis names into shardings on one mesh."""

  def __init__(self, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    self.mesh = mesh
    self.rules = tuple(rules)

  @contextlib.contextmanager
  def context(self):
    """Activates the mesh and the logical rules (needed while tracing sharded modules)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def sharding(self, logical_spec: P) -> NamedSharding:
    return nn.logical_to_mesh_sharding(logical_spec, self.mesh, self.rules)

  def shardings(self, logical_specs: Any) -> Any:
    """Pytree of logical ``PartitionSpec`` -> pytree of ``NamedSharding``."""
    return jax.tree_util.tree_map(self.sharding, logical_specs, is_leaf=lambda x: isinstance(x, P))

  def batch_sharding(self) -> NamedSharding:
    """Batches ``[batch, length]`` split over the data and expert axes."""
    return NamedSharding(self.mesh, P(("data", "expert")))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def _adafactor_deleted_dim(shape: tuple[int, ...], which: str) -> int:
  """Index optax's Adafactor removes for ``v_row`` / ``v_col`` (its two largest dims)."""
  order = np.argsort(np.asarray(shape), kind="stable")
  d1, d0 = int(order[-2]), int(order[-1])
  return d0 if which == "v_row" else d1


def state_logical_axes(state: Any, params: Any, params_axes: Any) -> Any:
  """Logical ``PartitionSpec`` for every leaf of an optimizer state.

  A state leaf whose key path ends with a param's key path inherits that param's axes: equal
  shape -> same spec; one dimension fewer (Adafactor's factored ``v_row``/``v_col``) -> the spec
  without the reduced dimension; anything else (counts, ``(1,)`` placeholders) is replicated.

  Args:
    state: optimizer state pytree (arrays or ``ShapeDtypeStruct``).
    params: params pytree (unboxed arrays or ``ShapeDtypeStruct``).
    params_axes: params-structured pytree of logical ``PartitionSpec``.
  Returns:
    state-structured pytree of logical ``PartitionSpec``.
  """
  param_leaves = {}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_axes = jax.tree_util.tree_leaves(params_axes, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(flat_params, flat_axes):
    param_leaves[param_tree.path_names(path)] = (tuple(leaf.shape), spec)

  def spec_for(path, leaf):
    names = param_tree.path_names(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for start in range(len(names)):
      match = param_leaves.get(names[start:])
      if match is None:
        continue
      pshape, spec = match
      spec = tuple(spec) + (None,) * (len(pshape) - len(spec))
      if shape == pshape:
        return P(*spec)
      if len(shape) == len(pshape) - 1:
        candidates = [d for d in range(len(pshape)) if pshape[:d] + pshape[d + 1 :] == shape]
        which = next((n for n in names if n in ("v_row", "v_col")), None)
        if which is not None and _adafactor_deleted_dim(pshape, which) in candidates:
          deleted = _adafactor_deleted_dim(pshape, which)
        elif candidates:
          deleted = candidates[-1]
        else:
          return P()
        return P(*(spec[:deleted] + spec[deleted + 1 :]))
      return P()
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, state)


def sharded_abstract_params(model: Any, partitioner: "Partitioner") -> Any:
  """Unboxed ``ShapeDtypeStruct`` params carrying their shardings (target of a sharded restore)."""
  with partitioner.context():
    shardings = partitioner.shardings(model.params_logical_axes())
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0))))
  return jax.tree_util.tree_map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )
