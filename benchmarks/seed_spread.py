r"""How much of a study's method-to-method gap is the seed? The claim quantities over replicate runs.

  python benchmarks/seed_spread.py --runs runs/seed0,runs/seed1,runs/seed2 \
      --reference lifelong_moe_offset2_src [--methods finetune,distill_only,...] \
      [--out runs/seed_spread]

``--runs`` are model dirs of the same study schedule run with different seeds (``--gin_bindings
"LifelongSchedule.seed = 1"``), each with its ``report.json``. For every method complete in every
run it prints the mean, sample standard deviation and per-run values of the claim quantities
(``claims.method_summary``: first distribution's perplexity change, last distribution's gap to
finetune, token-weighted final NLL, new experts' share and drift), the paired final-NLL and
retention differences to ``--reference`` within each run (the same phase-A checkpoint), and the
final-NLL ranking of each run (``lifelong/seed_replicates.py``). ``--out`` also writes
``OUT.json``, ``OUT.md`` and ``OUT.png`` (final NLL and first-distribution change per method, one
dot per run).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

from lifelong_moe_jax.lifelong import phase_results  # pylint: disable=g-import-not-at-top
from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong import report_plots
from lifelong_moe_jax.lifelong import seed_replicates


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", required=True, help="comma-separated model dirs with report.json")
  p.add_argument("--reference", default=None, help="method the paired differences are taken to")
  p.add_argument("--methods", default=None, help="comma-separated methods (default: all common)")
  p.add_argument("--out", default=None, help="also write OUT.json, OUT.md and OUT.png")
  return p.parse_args()


def load_reports(run_dirs: list[str]) -> list[dict]:
  """The ``report.json`` of each run dir; SystemExit naming a dir without one, before reading any."""
  for run in run_dirs:
    path = os.path.join(run, report_lib.REPORT_JSON)
    if not os.path.isfile(path):
      raise SystemExit(
        f"{path} does not exist: give model dirs of finished study runs (python -m "
        "lifelong_moe_jax.study ... writes report.json), or rebuild it with run_lifelong "
        "--report_only."
      )
  return [report_lib.load_report(run) for run in run_dirs]


def plot(spreads: dict, run_seeds: list[int], path: str) -> None:
  """Two panels, one row per method: final NLL and first-distribution change, a dot per run
  (one color per run, so a run's methods can be compared with each other)."""
  plt = report_plots.pyplot()
  names = list(spreads)
  fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.4 * len(names)), squeeze=False)
  for ax, quantity, scale in (
    (axes[0][0], "final_nll", 1.0),
    (axes[0][1], "retention", 100.0),
  ):
    for row, name in enumerate(names):
      s = spreads[name].get(quantity)
      if s is None:
        continue
      for run, value in enumerate(s.values):
        label = f"seed {run_seeds[run]}" if row == 0 and quantity == "final_nll" else None
        ax.plot([scale * value], [row], "o", alpha=0.75, color=f"C{run % 10}", label=label)
      ax.plot([scale * s.mean], [row], "|", markersize=14, color="black")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names if quantity == "final_nll" else [""] * len(names), fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(
      "token-weighted final NLL (nats/token)"
      if quantity == "final_nll"
      else "first distribution's perplexity change (%)"
    )
  axes[0][0].legend(fontsize=7, loc="best")
  fig.suptitle("Replicate runs: one dot per run (color = seed), black bar = mean", fontsize=10)
  fig.tight_layout()
  report_plots.save_png(fig, path, plt)


def main() -> None:
  args = parse_args()
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
  reports = load_reports(runs)
  try:
    summary = seed_replicates.summarize(reports, args.reference, methods)
  except seed_replicates.ReplicateError as e:
    raise SystemExit(str(e)) from None
  lines = seed_replicates.spread_tables(summary)
  print("\n".join(lines))
  if args.out:
    phase_results.write_json_atomic(args.out + ".json", {"runs": runs, **summary.to_dict()})
    report_plots.write_atomic(args.out + ".md", lambda f: f.write("\n".join(lines) + "\n"))
    plot(summary.spreads, summary.seeds, args.out + ".png")
    print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png")


if __name__ == "__main__":
  main()
