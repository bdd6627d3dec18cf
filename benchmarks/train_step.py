r"""Train-step throughput of the demo model on 1 and on 8 (fake CPU) devices, and the share of the
step time spent outside the jitted step (input pipeline, host work).

  python benchmarks/train_step.py [--steps 5] [--rounds 3] [--batch 16] [--length 256] [--mixture lifelong_all]

For each mesh (1 device; data=2 x expert=4 over 8 devices) in one process:

* ``jit``: the compiled step alone, on one batch already on the devices (device time per step);
* ``loop``: ``Trainer.fit`` on the real input pipeline (tf.data -> global arrays -> step), with
  metrics fetched, NaN-checked and written to TensorBoard/JSONL every 5 steps;
* ``outside = (loop - jit) / loop``: the part of a training step not hidden behind device work
  (target < 10%);
* ``input``: seconds per batch the input pipeline needs on its own (it overlaps device work in
  ``loop`` because dispatch is asynchronous).

Timed rounds alternate between the meshes (the machine is shared and noisy); medians are printed,
then the 8-device / 1-device ratios. Needs the prepared data (python -m lifelong_moe_jax.data.prepare).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

from clu.data import TfDatasetIterator  # noqa: E402  pylint: disable=g-import-not-at-top
import gin  # noqa: E402
import jax  # noqa: E402

from lifelong_moe_jax import gin_utils  # noqa: E402
from lifelong_moe_jax import partitioning as pt  # noqa: E402
from lifelong_moe_jax.data import pipeline  # noqa: E402
from lifelong_moe_jax.data import vocab  # noqa: E402
from lifelong_moe_jax.models import lm  # noqa: E402
from lifelong_moe_jax.models.config import ModelConfig  # noqa: E402
from lifelong_moe_jax.training import summaries  # noqa: E402
from lifelong_moe_jax.training import optimizers  # noqa: E402
from lifelong_moe_jax.training import trainer as trainer_lib  # noqa: E402
import tasks  # noqa: E402,F401  registers the seqio tasks (and their gin configurables)


class Setup:
  """One mesh: trainer, compiled step, a live input iterator and a resident state."""

  def __init__(self, name, mesh, config, args, logdir):
    self.name = name
    self.args = args
    self.trainer = trainer_lib.Trainer(
      lm.LanguageModel(config),
      pt.Partitioner(mesh),
      optimizers.create_optimizer(
        "adafactor", optimizers.learning_rate_schedule("rsqrt", 1e-2, warmup_steps=100)
      ),
    )
    ds = pipeline.get_dataset(
      args.mixture, {"targets": args.length}, "train", args.batch, shuffle=True, seed=0, repeat=True
    )
    self.batches = TfDatasetIterator(ds, checkpoint=True)
    self.state = self.trainer.init_state()
    self.batch = self.trainer.global_batch(next(self.batches))
    t0 = time.perf_counter()
    self.trainer.compile_train_step(self.state, self.batch)
    self.compile_s = time.perf_counter() - t0
    self.writer = summaries.MetricsWriter(logdir)
    self.jit_s, self.loop_s, self.input_s = [], [], []
    self.jit_round(2)
    self.loop_round(2)

  def jit_round(self, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, m = self.trainer.train_step(self.state, self.batch)
    jax.block_until_ready((self.state, m))
    return (time.perf_counter() - t0) / steps

  def loop_round(self, steps):
    t0 = time.perf_counter()
    self.state = self.trainer.fit(
      self.state,
      self.batches,
      train_steps=int(self.state.step) + steps,
      writer=self.writer,
      loop=trainer_lib.LoopConfig(summary_every_steps=5, log_every_steps=10**9),
    )
    jax.block_until_ready(self.state)
    return (time.perf_counter() - t0) / steps

  def input_round(self, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
      next(self.batches)
    return (time.perf_counter() - t0) / steps

  def measure(self):
    self.jit_s.append(self.jit_round(self.args.steps))
    self.loop_s.append(self.loop_round(self.args.steps))
    self.input_s.append(self.input_round(self.args.steps))

  def summary(self):
    jit_s, loop_s = statistics.median(self.jit_s), statistics.median(self.loop_s)
    tokens = self.args.batch * self.args.length
    return {
      "jit_step_s": jit_s,
      "loop_step_s": loop_s,
      "input_s_per_batch": statistics.median(self.input_s),
      "tokens_per_s": tokens / loop_s,
      "jit_tokens_per_s": tokens / jit_s,
      "outside_fraction": max(0.0, loop_s - jit_s) / loop_s,
      "compile_s": self.compile_s,
    }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=16, help="global batch (multiple of 8)")
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--mixture", default="lifelong_all")
  parser.add_argument("--gin_file", default="models/demo.gin")
  args = parser.parse_args()
  gin_utils.quiet_library_logs()
  vocabulary = vocab.get_vocabulary()
  gin.clear_config()
  gin_utils.parse_gin([args.gin_file], [])
  config = lm.build_model(ModelConfig(), vocabulary.vocab_size).config
  devices = jax.devices()
  meshes = [
    ("1 device", pt.create_mesh(pt.MeshConfig(1, 1, 1), devices[:1])),
    (f"{len(devices)} devices (data=2, expert=4)", pt.create_mesh(pt.MeshConfig(2, 4, 1))),
  ]
  with tempfile.TemporaryDirectory() as tmp:
    setups = [
      Setup(name, mesh, config, args, os.path.join(tmp, str(i)))
      for i, (name, mesh) in enumerate(meshes)
    ]
    for _ in range(args.rounds):
      for s in setups:
        s.measure()
    for s in setups:
      s.writer.close()
  print(
    f"demo model ({args.gin_file}), batch {args.batch} x {args.length} tokens, "
    f"{args.rounds} rounds x {args.steps} steps, medians:"
  )
  results = {}
  for s in setups:
    r = results[s.name] = s.summary()
    print(
      f"  {s.name:32s} loop {r['tokens_per_s']:9,.0f} tokens/s  step {r['loop_step_s'] * 1e3:7.1f} ms"
      f" | jit alone {r['jit_step_s'] * 1e3:7.1f} ms | outside jit {r['outside_fraction']:6.1%}"
      f" | input alone {r['input_s_per_batch'] * 1e3:6.1f} ms/batch | compile {r['compile_s']:.1f} s"
    )
  one, many = (results[s.name] for s in setups)
  print(
    f"  ratio 8 / 1 device: tokens/s x{many['tokens_per_s'] / one['tokens_per_s']:.2f}, "
    f"step time x{many['loop_step_s'] / one['loop_step_s']:.2f}"
  )
  worst = max(r["outside_fraction"] for r in results.values())
  print(f"  outside-jit fraction (worst mesh): {worst:.1%} (target < 10%)")


if __name__ == "__main__":
  main()
