r"""Train-step throughput of the MoE demo model vs a dense model with the same activated FLOPs.

  python benchmarks/moe_vs_dense.py [--steps 20] [--batch 16] [--length 256]
      [--num_experts 64] [--group_size 4096] [--dispatches einsum,sort]
  python benchmarks/moe_vs_dense.py --preset glam_small --dispatches einsum,sort

All models are compiled first, then timed in alternating rounds within one run (the machine
is noisy); the printed ratio is the median over rounds of MoE / dense tokens/s (target >= 0.85).

``--num_experts`` changes the number of experts of the MoE model only: top-2 routing activates
two experts of the same width whatever their number, so the dense counterpart (and the activated
FLOPs per token) stays the same while dispatch gets costlier. ``--preset glam_small`` is the
GLaM-shaped small configuration: the demo model with GLaM 0.1B/64E's routing (64 experts,
group size 4096, top-2, capacity factor 1.25, MoE every other layer); batch x length must cover
a group (the default 16 x 256 = 4096 tokens does). Every dispatch in ``--dispatches`` is timed
(``ragged`` is skipped on CPU above 8 experts, where XLA runs ``ragged_dot`` as a dense masked
matmul); the summary line ``ratio moe/dense`` uses the fastest dispatch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # pylint: disable=g-import-not-at-top
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.model_info import model_info
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel


PRESETS = {
  "glam_small": {
    "num_experts": 64,
    "group_size": 4096,
    "top_k": 2,
    "moe_every": 2,
    "train_capacity_factor": 1.25,
  }
}


def load_config(gin_file: str, vocab_size: int, **overrides) -> ModelConfig:
  """ModelConfig from a gin file, with ``ModelConfig.<name> = value`` overrides."""
  gin.clear_config()
  bindings = [f"ModelConfig.vocab_size = {vocab_size}"]
  bindings += [f"ModelConfig.{k} = {v!r}" for k, v in overrides.items() if v is not None]
  gin_utils.parse_gin([gin_file], bindings)
  return ModelConfig()


def make_step(config: ModelConfig, batch: int, length: int):
  model = LanguageModel(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  tx = optax.adafactor(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (_, metrics), grads = jax.value_and_grad(
      lambda p: model.loss(p, batch, train=True, rng=rng), has_aux=True
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics["loss"]

  toks = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 1, config.vocab_size)
  data = {"decoder_input_tokens": toks, "decoder_target_tokens": jnp.roll(toks, -1, 1)}
  state = [params, opt_state]

  def run(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
      state[0], state[1], loss = step(state[0], state[1], data, jax.random.PRNGKey(i))
    loss.block_until_ready()
    return n * batch * length / (time.perf_counter() - start)

  run(2)  # compile + warm up
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--moe_gin", default="models/demo.gin")
  parser.add_argument("--dense_gin", default="models/demo_dense.gin")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument(
    "--preset",
    choices=sorted(PRESETS),
    default=None,
    help="routing preset applied to the MoE model (glam_small: 64 experts, group 4096)",
  )
  parser.add_argument("--num_experts", type=int, default=None, help="experts of the MoE model")
  parser.add_argument("--group_size", type=int, default=None, help="routing group size")
  parser.add_argument(
    "--dispatches",
    default="einsum",
    help="comma-separated MoE dispatches to time (einsum, sort, ragged)",
  )
  args = parser.parse_args()

  overrides = dict(PRESETS.get(args.preset, {}))
  if args.num_experts is not None:
    overrides["num_experts"] = args.num_experts
  if args.group_size is not None:
    overrides["group_size"] = args.group_size
  configs = {}
  platform = jax.devices()[0].platform
  for dispatch in args.dispatches.split(","):
    cfg = load_config(args.moe_gin, args.vocab_size, moe_dispatch=dispatch, **overrides)
    if dispatch == "ragged" and platform == "cpu" and cfg.num_experts > 8:
      print(
        f"skipping 'ragged' on CPU with {cfg.num_experts} experts (ragged_dot runs as a dense "
        "masked matmul there)"
      )
      continue
    configs[f"moe_{dispatch}"] = cfg
  configs["dense"] = load_config(args.dense_gin, args.vocab_size)
  moe_cfg = next(iter(configs.values()))
  print(
    f"MoE: {moe_cfg.num_experts} experts, top-{moe_cfg.top_k}, group size "
    f"{moe_cfg.group_size}, capacity factor {moe_cfg.train_capacity_factor}; batch "
    f"{args.batch} x {args.length} tokens"
  )
  for name in (next(iter(configs)), "dense"):
    info = model_info(configs[name], args.length)
    print(
      f"{name:12s}: total params {info.total_params:,}  activated {info.activated_params:,}  "
      f"train FLOPs/token {info.train_flops_per_token:,.0f}"
    )
  runners = {name: make_step(cfg, args.batch, args.length) for name, cfg in configs.items()}
  rates = {name: [] for name in runners}
  for r in range(args.rounds):
    for name, run in runners.items():
      rates[name].append(run(args.steps))
    print(f"round {r}: " + "  ".join(f"{n} {rates[n][-1]:,.0f} tok/s" for n in rates), flush=True)
  med = {name: statistics.median(v) for name, v in rates.items()}
  print("median tokens/s: " + "  ".join(f"{n} {v:,.0f}" for n, v in med.items()))
  # Ratios are medians of per-round ratios: each round runs the models back to back, so a
  # change in machine load between rounds cancels out.
  ratio = {
    n: statistics.median(m / d for m, d in zip(rates[n], rates["dense"]))
    for n in med
    if n != "dense"
  }
  for name, value in ratio.items():
    print(
      f"ratio {name}/dense = {value:.3f} (per round: "
      + ", ".join(f"{m / d:.2f}" for m, d in zip(rates[name], rates["dense"]))
      + ")"
    )
  best = max(ratio, key=ratio.get)
  print(
    f"ratio moe/dense = {ratio[best]:.3f} (best dispatch: {best[4:]}; target >= 0.85) on {platform}"
  )


if __name__ == "__main__":
  main()
