r"""Parameter and FLOP counts of a gin-configured model, without allocating its parameters.

  python -m lifelong_moe_jax.model_info --gin_file=models/glam_0.1b_64e.gin [--length 1024]

Counts come from ``jax.eval_shape`` of the model's init (abstract evaluation), so the GLaM
configurations can be inspected on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from absl import flags
import flax.linen as nn
import jax

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

flags.DEFINE_integer("length", None, "Sequence length for attention FLOPs (default: max_length).")
flags.DEFINE_boolean("json", False, "Print JSON instead of a table.")


@dataclasses.dataclass
class ModelInfo:
  total_params: int
  activated_params: int
  expert_params: int
  embedding_params: int
  forward_flops_per_token: float
  train_flops_per_token: float
  num_moe_layers: int
  num_experts: int


def model_info(config: ModelConfig, length: int | None = None) -> ModelInfo:
  """Counts parameters and FLOPs per token.

  Activated params count a token's share: each expert tensor contributes ``top_k / num_experts``
  of its size. Forward FLOPs per token = 2 x activated matmul params (embedding lookup excluded,
  output projection included) + attention scores and values ``4 * layers * length * heads *
  head_dim / 2`` (causal average); training = 3 x forward.
  """
  length = length or config.max_length
  boxed = LanguageModel(config).abstract_params()
  axes = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  total = expert = embedding = 0
  activated = 0.0
  for leaf, spec, path in zip(
    jax.tree_util.tree_leaves(shapes),
    jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
    [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]],
  ):
    size = math.prod(leaf.shape)
    total += size
    names = tuple(spec)
    if "expert" in names and "mlp" in names:  # expert weights (the router is always active)
      expert += size
      activated += size * config.top_k / config.num_experts
    elif "embedding" in jax.tree_util.keystr(path):
      embedding += size
      if config.tie_embeddings:
        activated += size  # reused as the output projection
    else:
      activated += size
  attention = 4 * config.num_layers * (length / 2) * config.num_heads * config.head_dim
  forward = 2 * activated + attention
  return ModelInfo(
    total_params=total,
    activated_params=int(activated),
    expert_params=expert,
    embedding_params=embedding,
    forward_flops_per_token=forward,
    train_flops_per_token=3 * forward,
    num_moe_layers=config.num_moe_layers,
    num_experts=config.num_experts,
  )


@dataclasses.dataclass
class DeviceMemory:
  """Bytes one device holds of the train state (the largest shard of every leaf)."""

  params_bytes: int
  optimizer_bytes: int
  mesh: dict[str, int]
  optimizer: str

  @property
  def total_bytes(self) -> int:
    return self.params_bytes + self.optimizer_bytes


def _shard_bytes(
  shape: tuple[int, ...], dtype, spec: Any, mesh_shape: dict[str, int], rules
) -> int:
  """Bytes of the largest shard of an array with logical ``spec`` on a mesh of ``mesh_shape``."""
  rule = dict(rules)
  dims = list(shape)
  for i, name in enumerate(tuple(spec)[: len(dims)]):
    axes = rule.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    split = math.prod(mesh_shape.get(a, 1) for a in axes)
    dims[i] = -(-dims[i] // split)
  return math.prod(dims) * jax.numpy.dtype(dtype).itemsize


def per_device_memory(
  config: ModelConfig, mesh_shape: dict[str, int], optimizer_name: str = "adafactor"
) -> DeviceMemory:
  """Per-device bytes of params + optimizer state, from abstract shapes only (nothing allocated).

  Uses the logical axes of the params, ``partitioning.state_logical_axes`` for the optimizer
  state (exactly what the trainer shards with) and ``partitioning.DEFAULT_RULES``; a dimension of
  size ``n`` split over ``k`` devices counts ``ceil(n / k)``.

  Args:
    config: the model.
    mesh_shape: total axis sizes ``{"data": .., "expert": .., "model": ..}`` (DCN included).
    optimizer_name: "adafactor" or "adamw" (``optimizers.create_optimizer`` with defaults).
  """
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import optimizers  # pylint: disable=import-outside-toplevel

  boxed = LanguageModel(config).abstract_params()
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  params_axes = nn.get_partition_spec(boxed)
  params = nn.unbox(boxed)
  optimizer = optimizers.create_optimizer(optimizer_name, lambda step: 1e-3)
  opt = jax.eval_shape(optimizer.tx.init, params)
  opt_axes = partitioning.state_logical_axes(opt, params, params_axes)
  rules = partitioning.DEFAULT_RULES

  def total(tree, axes):
    leaves = jax.tree_util.tree_leaves(tree)
    specs = jax.tree_util.tree_leaves(axes, is_leaf=is_spec)
    return sum(
      _shard_bytes(tuple(l.shape), l.dtype, sp, mesh_shape, rules) for l, sp in zip(leaves, specs)
    )

  return DeviceMemory(
    params_bytes=total(params, params_axes),
    optimizer_bytes=total(opt, opt_axes),
    mesh=dict(mesh_shape),
    optimizer=optimizer_name,
  )


def _fmt(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def main(argv):
  del argv
  gin_utils.parse_from_flags()
  config = ModelConfig()
  info = model_info(config, flags.FLAGS.length)
  if flags.FLAGS.json:
    print(json.dumps(dataclasses.asdict(info), indent=2))
    return
  print(
    f"layers={config.num_layers} d_model={config.embed_dim} heads={config.num_heads}x{config.head_dim} "
    f"mlp={config.mlp_dim} experts={config.num_experts} (top-{config.top_k}, "
    f"{info.num_moe_layers} MoE layers) vocab={config.vocab_size}"
  )
  for key, value in dataclasses.asdict(info).items():
    if key not in ("num_moe_layers", "num_experts"):
      print(f"  {key:28s} {_fmt(value):>10s}  ({value:,.0f})")


if __name__ == "__main__":
  gin_utils.run(main)
