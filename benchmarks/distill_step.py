r"""Step time of ``lifelong_moe`` (freeze + distillation) against ``expand_freeze`` (freeze only).

  python benchmarks/distill_step.py [--steps 5] [--rounds 5] [--batch 8] [--length 256] \
      [--teacher_dispatch einsum,sort,ragged] [--gin_file models/demo.gin]

The demo model after one expansion (E0 -> E0 + 2 experts per MoE layer, old experts frozen) trains
on one device with the compiled train step on a batch already on the device:

* ``expand_freeze``: the student alone (the reference);
* ``lifelong_moe (teacher <dispatch>)``: plus ``Distillation`` from the E0-expert teacher, whose
  forward runs in the same step in eval mode (``--teacher_train_capacity`` adds one at the train
  capacity factor instead of the eval one: ``MethodOptions.teacher_capacity = "train"``). The teacher's MoE dispatch is the model's own
  (``"einsum"``, eval capacity factor) unless ``--teacher_dispatch`` lists others: a dropless
  ``"ragged"`` teacher computes the same logits as a capacity-based one that drops nothing, without
  the padding of ``eval_capacity_factor * top_k`` slots per token.

``--teacher_samples`` adds Lifelong-MoE with the distillation on rows of teacher samples instead of
the batch (``MethodOptions.distill_inputs = "teacher_samples"``, ``lifelong.pseudo_rehearsal``):
the step then runs the student twice (batch and rehearsal rows) and the teacher once.

Timed rounds alternate between the setups (the machine is shared and noisy); medians are printed
with the ratio to ``expand_freeze`` (issue 12's target: at most 1.3x).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lifelong_moe_jax import gin_utils  # noqa: E402
from lifelong_moe_jax import partitioning as pt  # noqa: E402
from lifelong_moe_jax.lifelong import distill  # noqa: E402
from lifelong_moe_jax.lifelong import expansion  # noqa: E402
from lifelong_moe_jax.lifelong import freeze  # noqa: E402
from lifelong_moe_jax.lifelong import pseudo_rehearsal  # noqa: E402
from lifelong_moe_jax.models import lm  # noqa: E402
from lifelong_moe_jax.models.config import ModelConfig  # noqa: E402
from lifelong_moe_jax.training import optimizers  # noqa: E402
from lifelong_moe_jax.training import trainer as trainer_lib  # noqa: E402


class Setup:
  """One recipe: a trainer with its regularizers, a resident state and batch, a compiled step."""

  def __init__(self, name, student, partitioner, frozen, regularizers, batch, args):
    self.name = name
    abstract = nn.unbox(student.abstract_params())
    mask = freeze.freeze_mask(abstract, student.params_logical_axes(), frozen)
    self.trainer = trainer_lib.Trainer(
      student,
      partitioner,
      optimizers.create_optimizer(
        "adafactor", optimizers.learning_rate_schedule("rsqrt", 1e-2, warmup_steps=100)
      ),
      regularizers=regularizers,
      optimizer_wrapper=lambda tx: freeze.with_frozen(tx, mask),
    )
    self.state = self.trainer.init_state()
    self.aux = self.trainer.init_aux_states(self.state)
    self.batch = self.trainer.global_batch(batch)
    t0 = time.perf_counter()
    self.trainer.compile_train_step(self.state, self.batch, self.aux)
    self.compile_s = time.perf_counter() - t0
    self.times = []
    self.steps = args.steps
    self.round()  # warm-up

  def round(self):
    t0 = time.perf_counter()
    for _ in range(self.steps):
      self.state, metrics = self.trainer.train_step(self.state, self.batch, self.aux)
    jax.block_until_ready((self.state, metrics))
    self.metrics = metrics
    return (time.perf_counter() - t0) / self.steps

  def measure(self):
    self.times.append(self.round())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--add_experts", type=int, default=2)
  parser.add_argument(
    "--teacher_dispatch", default="", help="comma-separated extra teacher dispatches to time"
  )
  parser.add_argument(
    "--teacher_train_capacity",
    action="store_true",
    help="also time a teacher that runs at the train capacity factor (eval mode otherwise)",
  )
  parser.add_argument(
    "--teacher_samples",
    action="store_true",
    help="also time distillation on teacher-sample rows (distill_inputs='teacher_samples')",
  )
  parser.add_argument(
    "--teacher_sample_batch",
    type=int,
    default=0,
    help="rehearsal rows per step with --teacher_samples (0: the train batch's)",
  )
  parser.add_argument("--gin_file", default="models/demo.gin")
  parser.add_argument("--vocab_size", type=int, default=8000, help="the demo vocabulary's size")
  args = parser.parse_args()
  gin_utils.quiet_library_logs()
  gin.clear_config()
  gin_utils.parse_gin([args.gin_file], [])
  base = lm.build_model(ModelConfig(max_length=args.length), args.vocab_size).config
  student = lm.LanguageModel(expansion.expanded_config(base, args.add_experts))
  partitioner = pt.Partitioner(pt.create_mesh(pt.MeshConfig(1, 1, 1), jax.devices()[:1]))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, base.vocab_size, (args.batch, args.length), dtype=np.int32)
  batch = {
    "decoder_input_tokens": np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], 1),
    "decoder_target_tokens": tokens,
    "decoder_loss_weights": np.ones_like(tokens, dtype=np.float32),
    "decoder_segment_ids": np.ones_like(tokens),
    "decoder_positions": np.broadcast_to(np.arange(args.length, dtype=np.int32), tokens.shape),
  }
  frozen = base.num_experts
  setups = [Setup("expand_freeze", student, partitioner, frozen, (), batch, args)]
  dispatches = [base.moe_dispatch] + [
    d for d in args.teacher_dispatch.split(",") if d and d != base.moe_dispatch
  ]
  variants = [(f"teacher {d}", dict(moe_dispatch=d)) for d in dispatches]
  if args.teacher_train_capacity:
    variants.append(
      (
        f"teacher cf {base.train_capacity_factor:g}",
        dict(eval_capacity_factor=base.train_capacity_factor),
      )
    )
  for label, changes in variants:
    teacher = lm.LanguageModel(dataclasses.replace(base, **changes))
    with partitioner.context():
      teacher_params = nn.unbox(jax.jit(teacher.init)(jax.random.PRNGKey(1)))
    reg = distill.Distillation(teacher, teacher_params)
    setups.append(
      Setup(f"lifelong_moe ({label})", student, partitioner, frozen, [reg], batch, args)
    )
  if args.teacher_samples:
    teacher = lm.LanguageModel(base)
    with partitioner.context():
      teacher_params = nn.unbox(jax.jit(teacher.init)(jax.random.PRNGKey(1)))
    seqs = [rng.integers(2, base.vocab_size, args.length // 2) for _ in range(8 * args.batch)]
    rows, _ = pseudo_rehearsal.pack_sequences(seqs, 4 * args.batch, args.length)
    reg = pseudo_rehearsal.TeacherSampleDistillation(
      teacher, teacher_params, rows, batch_size=args.teacher_sample_batch
    )
    setups.append(
      Setup("lifelong_moe (teacher samples)", student, partitioner, frozen, [reg], batch, args)
    )
  for _ in range(args.rounds):
    for s in setups:
      s.measure()
  ref = statistics.median(setups[0].times)
  print(
    f"demo model ({args.gin_file}) after +{args.add_experts} experts "
    f"({base.num_experts} -> {student.config.num_experts}, {base.num_experts} frozen), batch "
    f"{args.batch} x {args.length}, {args.rounds} rounds x {args.steps} steps, medians:"
  )
  for s in setups:
    t = statistics.median(s.times)
    kl = s.metrics.get("reg/distillation/kl", s.metrics.get("reg/distillation/kl_samples"))
    print(
      f"  {s.name:34s} step {t * 1e3:8.1f} ms  x{t / ref:.2f} of expand_freeze"
      f"  (compile {s.compile_s:.1f} s{'' if kl is None else f', last KL {float(kl):.4f}'})"
    )
  best = min(statistics.median(s.times) for s in setups[1 : 1 + len(variants)]) / ref
  print(f"  lifelong_moe / expand_freeze (best teacher): x{best:.2f} (target <= 1.3)")
  default = statistics.median(setups[1].times) / ref
  print(f"  lifelong_moe / expand_freeze (default teacher, eval capacity): x{default:.2f}")
  if args.teacher_train_capacity:  # MethodOptions.teacher_capacity = "train"
    train = statistics.median(setups[len(variants)].times) / ref
    print(f"  lifelong_moe / expand_freeze (teacher_capacity='train'): x{train:.2f}")
  if args.teacher_samples:
    samples = statistics.median(setups[-1].times) / ref
    print(f"  lifelong_moe / expand_freeze (distill_inputs='teacher_samples'): x{samples:.2f}")


if __name__ == "__main__":
  main()
