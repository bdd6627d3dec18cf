r"""Step-0 effect of the router-column options of expert expansion (``MethodOptions.router_init``).

  python benchmarks/router_init_step0.py \
      --checkpoint runs/study/shared/phase_0_wiki_en/checkpoints/1500 --data_dir ./data_study \
      --mixture lifelong_fortunes_intl \
      --eval_tasks lifelong_wiki_en,lifelong_fortunes_intl,lifelong_dialog_en \
      [--add_experts 2] [--router_inits copy,copy_offset,copy_contrast,zero,small_random] \
      [--old_mixture lifelong_wiki_en] [--router_old_offsets 4,8] \
      [--router_offsets 1,2,4] \
      [--length 128] [--eval_batch 8] [--eval_batches 8] [--mean_batches 4]

Restores a trained MoE checkpoint (its model config from the checkpoint metadata), evaluates the
validation loss/perplexity of every ``--eval_tasks`` distribution, then expands the params with
``--add_experts`` experts per MoE layer once per router-column option (copy init of the experts,
round-robin sources, ``--noise_scale`` noise, the same rng for every option, so the expert slices
are identical and only the router columns differ) and evaluates again right after the expansion,
before any update: the same deterministic validation batches, so the differences are the
expansion's alone. ``copy_offset``'s mean router input ``mu`` is measured on ``--mean_batches``
train batches of ``--mixture`` (the new phase's data) with the checkpoint's model, as a lifelong
phase start does; it is evaluated once per ``--router_offsets`` value. ``copy_contrast``'s shift
(``router_contrast.contrast_shift``) uses the router-input moments of ``--mixture`` and of
``--old_mixture`` (the earlier distribution; default the first ``--eval_tasks`` entry that is not
``--mixture``), also once per ``--router_offsets`` value, and per ``--router_old_offsets`` value
when given (the gap below the source on the earlier distribution, ``contrast_shift``'s
``old_margin``; rows ``copy_contrast (offset/old offset)``).

Prints one table: per option and distribution, the relative perplexity change
``ppl_after / ppl_before - 1`` and the share of the distribution's top-k routing assignments that
go to the new experts (mean over MoE layers). The issue's bar: with the default option, the change on
old distributions is at most 0.5%. Two diagnostics follow: the share of assignments dropped over
capacity (expert capacity is ``ceil(factor * k * group / E)``, so it shrinks when E grows) before
and after, and for every distribution the factor ``(mu_task . mu) / |mu|^2`` per MoE layer, i.e.
the fraction of ``router_offset`` that ``copy_offset`` subtracts on average from that distribution's
logits of the new experts (1 on the new data by construction; measured on ``--mean_batches``
train batches of each distribution, for the diagnostic only).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import phase_eval
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import router_contrast
from lifelong_moe_jax.lifelong import router_input
from lifelong_moe_jax.models import lm


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="step dir or run dir (latest step)")
  p.add_argument("--data_dir", default=None, help="prepared data dir (default: the usual one)")
  p.add_argument("--mixture", required=True, help="the new phase's task/mixture (for mu)")
  p.add_argument(
    "--eval_tasks",
    default=None,
    help="comma-separated distributions to evaluate (default: --mixture)",
  )
  p.add_argument("--add_experts", type=int, default=2)
  p.add_argument("--router_inits", default=",".join(expansion.ROUTER_INITS))
  p.add_argument(
    "--router_offsets",
    default="1.0",
    help="comma-separated copy_offset / copy_contrast gaps (one row each)",
  )
  p.add_argument(
    "--router_old_offsets",
    default="",
    help="comma-separated copy_contrast gaps below the source on --old_mixture (default: symmetric)",
  )
  p.add_argument(
    "--old_mixture",
    default=None,
    help="copy_contrast: the earlier distribution (default: first --eval_tasks entry != --mixture)",
  )
  p.add_argument("--noise_scale", type=float, default=0.01)
  p.add_argument("--length", type=int, default=128, help="targets length of the eval batches")
  p.add_argument("--eval_batch", type=int, default=8)
  p.add_argument("--eval_batches", type=int, default=8, help="batches per distribution")
  p.add_argument("--mean_batches", type=int, default=4, help="train batches for mu")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def dropped_share(result: dict) -> float:
  """Mean over MoE layers of the share of assignments dropped over capacity."""
  return float(np.mean(result["dropped_fraction"]))


def new_expert_share(result: dict, num_old: int) -> float:
  """Mean over MoE layers of the share of routing assignments that go to experts >= num_old."""
  usage = np.asarray(result["expert_usage"], np.float64)
  return float(np.mean(np.sum(usage[:, num_old:], axis=-1)))


def main() -> None:
  args = parse_args()
  inits = [s.strip() for s in args.router_inits.split(",") if s.strip()]
  for name in inits:
    if name not in expansion.ROUTER_INITS:
      raise SystemExit(f"--router_inits: unknown option {name!r}; known: {expansion.ROUTER_INITS}")
  tasks = (
    [t.strip() for t in args.eval_tasks.split(",") if t.strip()]
    if args.eval_tasks
    else [args.mixture]
  )
  old_mixture = args.old_mixture or next((t for t in tasks if t != args.mixture), None)
  if "copy_contrast" in inits and old_mixture is None:
    raise SystemExit(
      "--router_inits copy_contrast needs an earlier distribution: pass --old_mixture (or an "
      "--eval_tasks entry other than --mixture)."
    )
  gin_utils.import_task_modules(["tasks"])
  t0 = time.perf_counter()
  loaded = checkpoints.load_checkpoint(
    args.checkpoint, mesh_config=partitioning.MeshConfig(), data_dir=args.data_dir
  )
  model, params, partitioner = loaded.model, loaded.params, loaded.partitioner
  config = model.config
  if not config.is_moe:
    raise SystemExit(f"{loaded.step_dir} holds a dense model: nothing to expand.")
  lengths = {"targets": args.length}
  cache: dict = {}

  def evaluate(m: lm.LanguageModel, p) -> dict:
    evaluator = phase_eval.PhaseEvaluator(
      m,
      partitioner,
      tasks,
      lengths,
      args.eval_batch,
      max_batches=args.eval_batches,
      data_dir=args.data_dir,
      batch_cache=cache,
    )
    with partitioner.context():
      return evaluator.evaluate(p)

  before = evaluate(model, params)

  def moments(mixture: str):
    return router_input.measure_router_input_moments(
      model,
      params,
      partitioner,
      mixture,
      lengths,
      args.eval_batch,
      args.mean_batches,
      args.data_dir,
    )

  mu, second = moments(args.mixture)
  old = moments(old_mixture) if "copy_contrast" in inits else None
  new_model = lm.LanguageModel(expansion.expanded_config(config, args.add_experts))
  axes = model.params_logical_axes()
  offsets = [float(x) for x in args.router_offsets.split(",") if x.strip()]
  old_offsets = [float(x) for x in args.router_old_offsets.split(",") if x.strip()] or [None]
  shifted = expansion.COPIED_ROUTER_INITS
  variants = [
    (name, offset, old_offset)
    for name in inits
    for offset in (offsets if name in shifted else [0.0])
    for old_offset in (old_offsets if name == "copy_contrast" else [None])
  ]
  rows = {}
  for name, offset, old_offset in variants:
    label = f"{name} ({offset:g})" if name in shifted else name
    if old_offset is not None:
      label = f"{name} ({offset:g}/{old_offset:g})"
    shift = None
    if name == "copy_contrast":
      shift = router_contrast.contrast_shift(
        mu, second, old[0][None], old[1][None], offset, old_margin=old_offset
      )
    new_params = expansion.expand_params(
      params,
      axes,
      args.add_experts,
      init="copy",
      rng=jax.random.PRNGKey(args.seed),
      noise_scale=args.noise_scale,
      router_init=name,
      router_offset=offset,
      router_input_mean=mu,
      router_column_shift=shift,
    )
    rows[label] = evaluate(new_model, new_params)

  print(
    f"\n# router_init step-0 effect: {loaded.step_dir} (step {loaded.step}), "
    f"{config.num_experts} -> {config.num_experts + args.add_experts} experts per MoE layer, "
    f"mu from {args.mixture} ({args.mean_batches} x {args.eval_batch} train sequences), "
    f"noise_scale {args.noise_scale}; "
    f"{args.eval_batches} x {args.eval_batch} x {args.length} validation tokens per "
    "distribution\n"
  )
  print(
    "perplexity before expansion: "
    + ", ".join(
      f"{t} {before[t]['perplexity']:.2f} ({int(before[t]['num_tokens'])} tokens)" for t in tasks
    )
  )
  header = (
    "| router_init | " + " | ".join(f"{t} ppl change | {t} to new experts" for t in tasks) + " |"
  )
  print(header)
  print("|" + "---|" * (1 + 2 * len(tasks)))
  for label, result in rows.items():
    cells = []
    for t in tasks:
      change = result[t]["perplexity"] / before[t]["perplexity"] - 1.0
      cells.append(f"{100 * change:+.3f}%")
      cells.append(f"{100 * new_expert_share(result[t], config.num_experts):.1f}%")
    print(f"| {label} | " + " | ".join(cells) + " |")
  print(
    "\ndropped over capacity (mean over MoE layers): before "
    + ", ".join(f"{t} {100 * dropped_share(before[t]):.2f}%" for t in tasks)
  )
  for label, result in rows.items():
    print(f"  {label}: " + ", ".join(f"{t} {100 * dropped_share(result[t]):.2f}%" for t in tasks))
  print(
    "\ncopy_offset's mean offset on each distribution, as a fraction of router_offset "
    "((mu_task . mu) / |mu|^2 per MoE layer):"
  )
  for t in tasks:
    mu_t = router_input.measure_router_input_mean(
      model, params, partitioner, t, lengths, args.eval_batch, args.mean_batches, args.data_dir
    )
    factors = np.sum(mu_t * mu, axis=-1) / np.sum(mu * mu, axis=-1)
    print(f"  {t}: " + ", ".join(f"{f:.3f}" for f in factors))
  print(f"\nwall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
