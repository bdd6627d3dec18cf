r"""Which params carry the forgetting? A trained checkpoint evaluated with groups of its params put
back to an earlier checkpoint's values.

  python benchmarks/forgetting_attribution.py \
      --checkpoint runs/study/lifelong_moe_offset2_src/phase_1_fortunes_intl \
      --reference runs/study/shared/phase_0_wiki_en --data_dir ./data_study \
      --tasks lifelong_wiki_en,lifelong_fortunes_intl,lifelong_dialog_en \
      [--eval_batch 16] [--eval_batches 12] [--length 128] [--json out.json] [--png out.png]

``--checkpoint`` is a later phase of a lifelong run (step dir or run dir: its latest step),
``--reference`` an earlier one of the same model (at most as many experts). Rows: the reference
itself, the checkpoint as trained, then the checkpoint with one group restored to the reference's
values at a time (``eval/param_attribution.py``: embed, logits, attention, dense_mlp, norms,
old_experts = the reference's expert slices and router columns), all shared groups at once, and
everything the reference has (only the added experts keep their trained values). Each cell is the
validation perplexity and its change against the reference; ``--png`` draws the NLL change of every
row per distribution.

A group whose restoration brings an old distribution back to the reference's perplexity is where
its forgetting lives; one whose restoration ruins the new distribution is where its learning lives.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.eval import param_attribution
from lifelong_moe_jax.lifelong import report_plots
from lifelong_moe_jax.param_tree import ParamTreeError


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="the later checkpoint (step or run dir)")
  p.add_argument("--reference", required=True, help="the earlier checkpoint (step or run dir)")
  p.add_argument("--data_dir", default=None, help="prepared data dir (default: the usual one)")
  p.add_argument("--tasks", required=True, help="comma-separated distributions to evaluate")
  p.add_argument("--eval_batch", type=int, default=16)
  p.add_argument("--eval_batches", type=int, default=12, help="validation batches per task")
  p.add_argument("--length", type=int, default=128, help="targets length of the batches")
  p.add_argument("--json", default=None, help="also write the rows as JSON here")
  p.add_argument("--png", default=None, help="also draw the NLL changes here")
  return p.parse_args()


def attribution_rows(sizes: dict[str, int]) -> list[tuple[str, tuple[str, ...]]]:
  """``[(label, restored groups)]``: as trained, each non-empty group, all shared, everything."""
  groups = [g for g in param_attribution.PARAM_GROUPS if sizes[g]]
  shared = tuple(g for g in param_attribution.SHARED_GROUPS if sizes[g])
  return [
    ("trained", ()),
    *[(f"restore {g}", (g,)) for g in groups],
    ("restore all shared", shared),
    ("restore all shared + old experts", tuple(groups)),
  ]


def draw(rows: list[dict], tasks: list[str], path: str) -> None:
  """One panel per distribution: every row's NLL change against the reference (nats/token)."""
  plt = report_plots.pyplot()
  labels = [r["label"] for r in rows[1:]]
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 0.45 * len(labels) + 1.5))
  axes = np.atleast_1d(axes)
  for ax, task in zip(axes, tasks):
    base = rows[0]["results"][task]["loss"]
    deltas = [r["results"][task]["loss"] - base for r in rows[1:]]
    ax.barh(range(len(labels)), deltas, color=["tab:red" if d > 0 else "tab:green" for d in deltas])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels))
    ax.invert_yaxis()
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("NLL change vs reference (nats/token)")
  fig.suptitle("Forgetting attribution: params restored to the reference's values", fontsize=10)
  fig.tight_layout()
  report_plots.save_png(fig, path, plt)


def main() -> None:
  args = parse_args()
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not tasks:
    raise SystemExit("--tasks: give at least one distribution to evaluate.")
  gin_utils.import_task_modules(["tasks"])
  mesh = partitioning.MeshConfig()
  reference = checkpoints.load_checkpoint(args.reference, mesh_config=mesh, data_dir=args.data_dir)
  trained = checkpoints.load_checkpoint(args.checkpoint, mesh_config=mesh, data_dir=args.data_dir)
  axes = trained.model.params_logical_axes()
  host, ref_host = jax.device_get((trained.params, reference.params))
  try:
    param_attribution.check_compatible(host, ref_host, axes)
  except ParamTreeError as e:
    raise SystemExit(f"{args.checkpoint} vs {args.reference}: {e}") from None
  cache: dict = {}

  def evaluator(loaded):
    return loss_eval.Evaluator(
      loaded.model,
      loaded.partitioner,
      tasks,
      {"targets": args.length},
      args.eval_batch,
      max_batches=args.eval_batches,
      data_dir=args.data_dir,
      batch_cache=cache,
    )

  shardings = trained.partitioner.shardings(axes)
  rows = [
    {
      "label": "reference",
      "groups": [],
      "results": evaluator(reference).evaluate(reference.params),
    }
  ]
  trained_eval = evaluator(trained)
  sizes = param_attribution.group_sizes(host, axes)
  for label, groups in attribution_rows(sizes):
    params = param_attribution.restore_groups(host, ref_host, axes, groups)
    params = jax.device_put(params, shardings)
    rows.append({"label": label, "groups": list(groups), "results": trained_eval.evaluate(params)})
    print(f"evaluated: {label}", flush=True)
  print(
    f"{trained.step_dir} ({trained.model.config.num_experts} experts) with params restored to "
    f"{reference.step_dir} ({reference.model.config.num_experts} experts); "
    f"{args.eval_batches} batches of {args.eval_batch} x {args.length} per distribution"
  )
  print("| params | " + " | ".join(tasks) + " |")
  print("|---|" + "---|" * len(tasks))
  for row in rows:
    cells = []
    for task in tasks:
      ppl = row["results"][task]["perplexity"]
      change = ppl / rows[0]["results"][task]["perplexity"] - 1.0
      cells.append(f"{ppl:,.1f} ({change:+.1%})" if row is not rows[0] else f"{ppl:,.1f}")
    print(f"| {row['label']} | " + " | ".join(cells) + " |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(
        {
          "checkpoint": trained.step_dir,
          "reference": reference.step_dir,
          "group_sizes": sizes,
          "rows": rows,
        },
        f,
        indent=1,
      )
  if args.png:
    draw(rows, tasks, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
