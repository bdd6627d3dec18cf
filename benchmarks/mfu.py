r"""Model FLOPs utilisation (MFU) of a training step, per MoE dispatch.

  python benchmarks/mfu.py [--gin_file models/glam_0.1b_64e.gin] [--dispatches einsum,sort,ragged]
      [--batch 8] [--length 1024] [--steps 5] [--rounds 3] [--gin_param "ModelConfig.x = y" ...]

MFU = model FLOPs per step / step time / the chip's peak bf16 FLOP/s. Model FLOPs per token are
``model_info.train_flops_per_token`` (3 x forward: 2 x activated matmul params + causal
attention; rematerialisation and dispatch overheads are not model FLOPs). The step is the
jitted forward + backward + Adafactor update on one device, with the config's dtype (GLaM
0.1B/64E: bfloat16 activations, float32 params). Dispatches are timed in alternating rounds.

Peaks are looked up from the device kind (NVIDIA A100/H100/H200, TPU v4/v5e/v5p/v6e) or given
with ``--peak_tflops``. On CPU no peak is known: the script reports achieved model FLOP/s (and
skips ``ragged`` above 8 experts: XLA:CPU runs ``ragged_dot`` as a dense masked matmul).
``--gin_param`` bindings shrink the model for a quick run (e.g. on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import flax.linen as nn  # noqa: E402  pylint: disable=g-import-not-at-top
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from lifelong_moe_jax import gin_utils  # noqa: E402
from lifelong_moe_jax.model_info import model_info  # noqa: E402
from lifelong_moe_jax.models.config import ModelConfig  # noqa: E402
from lifelong_moe_jax.models.lm import LanguageModel  # noqa: E402

# Dense bf16 peak FLOP/s per chip, matched against ``device_kind`` (first match wins).
PEAK_BF16 = (
  ("h200", 989e12),
  ("h100 pcie", 756e12),
  ("h100", 989e12),
  ("a100", 312e12),
  ("l4", 121e12),
  ("tpu v6", 918e12),
  ("tpu v5p", 459e12),
  ("tpu v5 lite", 197e12),
  ("tpu v5e", 197e12),
  ("tpu v5", 459e12),
  ("tpu v4", 275e12),
)


def chip_peak(device) -> float | None:
  kind = device.device_kind.lower()
  return next((peak for name, peak in PEAK_BF16 if name in kind), None)


def load_config(gin_file: str, bindings: list[str]) -> ModelConfig:
  gin.clear_config()
  gin_utils.parse_gin([gin_file], bindings)
  return ModelConfig()


def make_step(config: ModelConfig, batch: int, length: int, params=None):
  """Compiles the train step on one device; returns ``run(steps) -> seconds per step``.

  ``params`` (optional) are initial params to copy: they do not depend on the dispatch, and
  compiling the init of a scanned, rematerialised model costs as much as compiling the step.
  """
  model = LanguageModel(config)
  if params is None:
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0)))
  else:
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs
  tx = optax.adafactor(1e-3)
  opt_state = jax.jit(tx.init)(params)

  def step(params, opt_state, batch, rng):
    (_, metrics), grads = jax.value_and_grad(
      lambda p: model.loss(p, batch, train=True, rng=rng), has_aux=True
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics["loss"]

  toks = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 1, config.vocab_size)
  data = {"decoder_input_tokens": toks, "decoder_target_tokens": jnp.roll(toks, -1, 1)}
  compiled = (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(params, opt_state, data, jax.random.PRNGKey(0))
    .compile()
  )
  state = [params, opt_state]

  def run(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
      state[0], state[1], loss = compiled(state[0], state[1], data, jax.random.PRNGKey(i))
    loss.block_until_ready()
    return (time.perf_counter() - start) / n

  initial = jax.tree.map(jnp.copy, params)
  run(1)  # warm up
  return run, initial


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", default="models/glam_0.1b_64e.gin")
  parser.add_argument(
    "--gin_param",
    action="append",
    default=[],
    help="extra gin binding, e.g. 'ModelConfig.num_layers = 2' (repeatable)",
  )
  parser.add_argument("--dispatches", default="einsum,sort,ragged")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=None,
    help="chip peak in TFLOP/s (default: looked up from the device kind)",
  )
  args = parser.parse_args()

  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else chip_peak(device)
  configs = {}
  for dispatch in args.dispatches.split(","):
    binding = f"ModelConfig.moe_dispatch = '{dispatch}'"
    config = load_config(args.gin_file, args.gin_param + [binding])
    if dispatch == "ragged" and device.platform == "cpu" and config.num_experts > 8:
      print(
        f"skipping 'ragged' on CPU with {config.num_experts} experts (XLA:CPU runs ragged_dot "
        "as a dense masked matmul, x num_experts FLOPs)"
      )
      continue
    configs[dispatch] = config
  cfg = next(iter(configs.values()))
  info = model_info(cfg, args.length)
  tokens = args.batch * args.length
  step_flops = info.train_flops_per_token * tokens
  print(
    f"{args.gin_file} {' '.join(args.gin_param)}: layers={cfg.num_layers} "
    f"d_model={cfg.embed_dim} experts={cfg.num_experts} group={cfg.group_size} "
    f"dtype={cfg.dtype} remat={cfg.remat} scan={cfg.scan_layers}"
  )
  print(
    f"activated params {info.activated_params:,}; train FLOPs/token "
    f"{info.train_flops_per_token:,.0f}; {tokens} tokens/step = {step_flops / 1e9:,.2f} "
    f"GFLOP/step; device: {device.platform} ({device.device_kind}), peak "
    + (f"{peak / 1e12:.0f} TFLOP/s bf16" if peak else "unknown"),
    flush=True,
  )
  runners, params = {}, None
  for dispatch, config in configs.items():
    t0 = time.perf_counter()
    runners[dispatch], params = make_step(config, args.batch, args.length, params)
    print(f"compiled {dispatch} in {time.perf_counter() - t0:.1f} s", flush=True)
  times = {d: [] for d in runners}
  for _ in range(args.rounds):
    for dispatch, run in runners.items():
      times[dispatch].append(run(args.steps))
  print(f"medians over {args.rounds} rounds x {args.steps} steps:")
  for dispatch, values in times.items():
    seconds = statistics.median(values)
    achieved = step_flops / seconds
    mfu = f"MFU {achieved / peak:6.1%}" if peak else "MFU n/a (no peak known for this device)"
    print(
      f"  {dispatch:8s} step {seconds * 1e3:9.1f} ms  {tokens / seconds:10,.0f} tokens/s  "
      f"model {achieved / 1e9:10,.2f} GFLOP/s  {mfu}"
    )


if __name__ == "__main__":
  main()
