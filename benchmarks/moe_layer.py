r"""Forward+backward throughput and compiled temporary memory of one MoE layer, per dispatch.

  python benchmarks/moe_layer.py [--configs e8,e64,e64_glam] [--dispatches einsum,sort,ragged]
      [--tokens 8192] [--steps 2] [--rounds 3]

Configurations (issue 12), tokens per step = ``--tokens`` (at least one group):
  e8        E=8,  embed 256, mlp 1024, group 256,  float32
  e64       E=64, embed 256, mlp 1024, group 4096, float32
  e64_glam  E=64, embed 768, mlp 3072, group 4096, bfloat16 (GLaM 0.1B/64E's MoE layer)
Top-2 routing, train capacity factor 1.25. For each configuration every dispatch is compiled
first (``compiled.memory_analysis().temp_size_in_bytes`` is the temporary memory XLA plans for
the step), then the dispatches are timed in alternating rounds (the machine is noisy); median
tokens/s and the median over rounds of each dispatch's speed-up over ``"einsum"`` are printed.

On CPU, XLA lowers ``jax.lax.ragged_dot`` to a dense matmul over a ``[tokens, E * embed]``
masked operand (E times the FLOPs), so ``"ragged"`` is skipped on CPU for E > 8 unless
``--ragged_on_cpu`` is given. ``--embed/--mlp/--group_size`` shrink every configuration (for a
quick smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lifelong_moe_jax.layers.moe import MoeLayer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  experts: int
  embed: int
  mlp: int
  group: int
  dtype: str = "float32"

  def describe(self) -> str:
    return f"E={self.experts}, embed {self.embed}, mlp {self.mlp}, group {self.group}, {self.dtype}"


CONFIGS = {
  "e8": LayerConfig(8, 256, 1024, 256),
  "e64": LayerConfig(64, 256, 1024, 4096),
  "e64_glam": LayerConfig(64, 768, 3072, 4096, "bfloat16"),
}


def make_runner(
  layer: nn.Module, tokens: int, cfg: LayerConfig
) -> tuple[Callable[[int], float], int]:
  """Compiles forward+backward of ``layer`` on ``tokens`` tokens.

  Args:
    layer: an MoeLayer-like module ``(x [batch, group, embed], train=True) -> same shape``.
    tokens: tokens per step (a multiple of ``cfg.group``).
    cfg: the configuration (for the input shape and dtype).
  Returns:
    (run, temp_bytes): ``run(steps)`` times ``steps`` steps and returns tokens/s; temp_bytes is
    the compiled step's temporary memory.
  """
  dtype = jnp.dtype(cfg.dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (tokens // cfg.group, cfg.group, cfg.embed), dtype)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape, dtype)
  params = nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(2), x)["params"])

  def loss(p, x):
    y, state = layer.apply({"params": p}, x, train=True, mutable=["intermediates"])
    aux = state["intermediates"]["aux_loss"][0]
    return jnp.sum((y * cotangent).astype(jnp.float32)) + 0.01 * aux

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  memory = compiled.memory_analysis()
  temp_bytes = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0

  def run(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      out = compiled(params, x)
    jax.block_until_ready(out)
    return steps * tokens / (time.perf_counter() - start)

  run(1)  # warm up
  return run, temp_bytes


def moe_layer(cfg: LayerConfig, dispatch: str) -> MoeLayer:
  return MoeLayer(
    num_experts=cfg.experts,
    mlp_dim=cfg.mlp,
    top_k=2,
    group_size=cfg.group,
    train_capacity_factor=1.25,
    dtype=jnp.dtype(cfg.dtype),
    dispatch=dispatch,
  )


def compare(
  cfg: LayerConfig,
  layers: dict[str, nn.Module],
  tokens: int,
  steps: int,
  rounds: int,
  reference: str = "einsum",
) -> dict[str, dict[str, float]]:
  """Compiles every layer, times them in alternating rounds, prints and returns the medians."""
  runners, temp = {}, {}
  for name, layer in layers.items():
    runners[name], temp[name] = make_runner(layer, tokens, cfg)
  rates = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      rates[name].append(run(steps))
  results = {}
  ref = reference if reference in runners else next(iter(runners))
  print(
    f"{cfg.describe()}; {tokens} tokens/step, {rounds} rounds x {steps} steps "
    f"(median tokens/s; speed-up = median over rounds of the ratio to {ref!r}):"
  )
  for name in runners:
    rate = statistics.median(rates[name])
    speedup = statistics.median(r / b for r, b in zip(rates[name], rates[ref]))
    results[name] = {"tokens_per_s": rate, "speedup": speedup, "temp_bytes": temp[name]}
    mem_ratio = temp[ref] / temp[name] if temp[name] else float("nan")
    print(
      f"  {name:8s} fwd+bwd {rate:12,.0f} tokens/s  x{speedup:5.2f}   "
      f"temp memory {temp[name] / 2**20:9.1f} MiB  ({mem_ratio:5.2f}x less than {ref})",
      flush=True,
    )
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="e8,e64,e64_glam")
  parser.add_argument("--dispatches", default="einsum,sort,ragged")
  parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (min one group)")
  parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--embed", type=int, default=None, help="override every config's embed")
  parser.add_argument("--mlp", type=int, default=None, help="override every config's mlp")
  parser.add_argument("--group_size", type=int, default=None, help="override every group size")
  parser.add_argument(
    "--ragged_on_cpu",
    action="store_true",
    help="time 'ragged' on CPU for E > 8 too (dense-masked ragged_dot)",
  )
  args = parser.parse_args()
  platform = jax.devices()[0].platform
  print(f"platform: {platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  for key in args.configs.split(","):
    cfg = CONFIGS[key]
    cfg = dataclasses.replace(
      cfg,
      embed=args.embed or cfg.embed,
      mlp=args.mlp or cfg.mlp,
      group=args.group_size or cfg.group,
    )
    dispatches = args.dispatches.split(",")
    if platform == "cpu" and cfg.experts > 8 and not args.ragged_on_cpu and "ragged" in dispatches:
      dispatches.remove("ragged")
      print(
        f"[{key}] skipping 'ragged' on CPU (ragged_dot is a dense masked matmul there, "
        f"x{cfg.experts} FLOPs); --ragged_on_cpu times it anyway"
      )
    tokens = max(args.tokens, cfg.group) // cfg.group * cfg.group
    compare(cfg, {d: moe_layer(cfg, d) for d in dispatches}, tokens, args.steps, args.rounds)


if __name__ == "__main__":
  main()
