r"""The best new-data perplexity output distillation allows, from a fitted model and the teacher.

  python benchmarks/distillation_bound.py \
      --fit runs/study/finetune/phase_2_dialog_en \
      --teacher runs/study/lifelong_moe_offset2_src/phase_1_fortunes_intl \
      --data_dir ./data_study --tasks lifelong_dialog_en --weights 1,0.3,0.1 \
      [--eval_batch 16] [--eval_batches 8] [--length 128] [--json out.json]

``--fit`` is a model fitted to the new distribution without a regulariser (fine-tuning's checkpoint
after the phase), ``--teacher`` the checkpoint a distilling method distils from in that phase (its
own checkpoint after the previous phase). For each distillation weight ``w`` it prints the
perplexity of ``(p_fit + w * p_teacher) / (1 + w)`` on every task's validation tokens: the
minimiser of the distillation objective (temperature 1) when the student fits the data as well as
``--fit`` (``eval/distill_bound.py``). A distilling method measured near this number lags
fine-tuning because of its objective, not its model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

from lifelong_moe_jax import checkpoints  # pylint: disable=g-import-not-at-top
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import distill_bound
from lifelong_moe_jax.eval import loss_eval


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--fit", required=True, help="model fitted to the new data (step or run dir)")
  p.add_argument("--teacher", required=True, help="the distillation teacher (step or run dir)")
  p.add_argument("--data_dir", default=None, help="prepared data dir (default: the usual one)")
  p.add_argument("--tasks", required=True, help="comma-separated distributions to evaluate")
  p.add_argument("--weights", default="1,0.3,0.1", help="comma-separated distillation weights")
  p.add_argument("--eval_batch", type=int, default=16)
  p.add_argument("--eval_batches", type=int, default=8, help="validation batches per task")
  p.add_argument("--length", type=int, default=128, help="targets length of the batches")
  p.add_argument("--json", default=None, help="also write the rows as JSON here")
  return p.parse_args()


def main() -> None:
  args = parse_args()
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  try:
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
  except ValueError:
    raise SystemExit(f"--weights: give numbers, e.g. 1,0.3,0.1 (got {args.weights!r}).") from None
  if not tasks or not weights or min(weights) < 0:
    raise SystemExit("--tasks and --weights (each >= 0) need at least one entry each.")
  gin_utils.import_task_modules(["tasks"])
  mesh = partitioning.MeshConfig()
  fit = checkpoints.load_checkpoint(args.fit, mesh_config=mesh, data_dir=args.data_dir)
  teacher = checkpoints.load_checkpoint(args.teacher, mesh_config=mesh, data_dir=args.data_dir)
  if fit.model.config.vocab_size != teacher.model.config.vocab_size:
    raise SystemExit(
      f"{args.fit} and {args.teacher} have different vocabularies: pass checkpoints of one run."
    )
  evaluator = loss_eval.Evaluator(
    fit.model,
    fit.partitioner,
    (),
    {"targets": args.length},
    args.eval_batch,
    data_dir=args.data_dir,
  )
  batches = {}
  for task in tasks:
    iterator, _ = evaluator._dataset(task, "validation")  # pylint: disable=protected-access
    batches[task] = list(itertools.islice(iterator, args.eval_batches))
    if not batches[task]:
      raise SystemExit(f"{task!r} has no validation batch of {args.eval_batch} sequences.")
  with fit.partitioner.context():
    fit_lls = distill_bound.token_log_likelihoods(fit.model, fit.params, batches)
  with teacher.partitioner.context():
    teacher_lls = distill_bound.token_log_likelihoods(teacher.model, teacher.params, batches)
  rows = []
  for task in tasks:
    (fit_ll, mask), (teacher_ll, _) = fit_lls[task], teacher_lls[task]
    rows.append(
      {
        "task": task,
        "fit": distill_bound.perplexity(fit_ll, mask),
        "teacher": distill_bound.perplexity(teacher_ll, mask),
        "bounds": {
          str(w): distill_bound.perplexity(
            distill_bound.mixture_log_likelihood(fit_ll, teacher_ll, w), mask
          )
          for w in weights
        },
        "tokens": float(mask.sum()),
      }
    )
  print(
    f"fit {fit.step_dir}, teacher {teacher.step_dir}; {args.eval_batches} batches of "
    f"{args.eval_batch} x {args.length} per task"
  )
  print("| task | fit model | teacher | " + " | ".join(f"bound at w={w:g}" for w in weights) + " |")
  print("|---|---|---|" + "---|" * len(weights))
  for row in rows:
    bounds = " | ".join(f"{row['bounds'][str(w)]:,.1f}" for w in weights)
    print(f"| {row['task']} | {row['fit']:,.1f} | {row['teacher']:,.1f} | {bounds} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"fit": fit.step_dir, "teacher": teacher.step_dir, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
