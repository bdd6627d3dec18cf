r"""Train-step throughput of the MoE demo model vs a dense model with the same activated FLOPs.

  python benchmarks/moe_vs_dense.py [--steps 20] [--batch 16] [--length 256]

Both models are compiled first, then timed in alternating rounds within one run (the machine
is noisy), and the ratio of median tokens/s is printed (target: MoE / dense >= 0.85).
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


def load_config(gin_file: str, vocab_size: int) -> ModelConfig:
  gin.clear_config()
  gin_utils.parse_gin([gin_file], [f"ModelConfig.vocab_size = {vocab_size}"])
  return ModelConfig()


def make_step(config: ModelConfig, batch: int, length: int):
  model = LanguageModel(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  tx = optax.adafactor(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (_, metrics), grads = jax.value_and_grad(
        lambda p: model.loss(p, batch, train=True, rng=rng), has_aux=True)(params)
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
  args = parser.parse_args()

  configs = {"moe": load_config(args.moe_gin, args.vocab_size),
             "dense": load_config(args.dense_gin, args.vocab_size)}
  for name, cfg in configs.items():
    info = model_info(cfg, args.length)
    print(f"{name:5s}: total params {info.total_params:,}  activated {info.activated_params:,}  "
          f"train FLOPs/token {info.train_flops_per_token:,.0f}")
  runners = {name: make_step(cfg, args.batch, args.length) for name, cfg in configs.items()}
  rates = {name: [] for name in runners}
  for r in range(args.rounds):
    for name, run in runners.items():
      rates[name].append(run(args.steps))
    print(f"round {r}: " + "  ".join(f"{n} {rates[n][-1]:,.0f} tok/s" for n in rates), flush=True)
  med = {name: statistics.median(v) for name, v in rates.items()}
  print(f"median tokens/s: moe {med['moe']:,.0f}  dense {med['dense']:,.0f}")
  print(f"ratio moe/dense = {med['moe'] / med['dense']:.3f} (target >= 0.85) on {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
