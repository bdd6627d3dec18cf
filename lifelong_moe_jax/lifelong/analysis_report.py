"""Step-0 and routing sections of the lifelong report (tables for ``report.md``, ``routing.png``).

Pure functions of the phase results / report dict (no JAX), used by ``report.py``:

* ``step0_summary``: per phase ``i > 0``, each distribution's perplexity at the end of phase
  ``i - 1`` ("before") and on phase ``i``'s step-0 checkpoint ("after_expansion", the phase
  result's ``eval_at_start``) and the relative change ``after / before - 1``;
* ``step0_table`` / ``routing_table``: Markdown tables; ``routing_figure``: per method (rows) and
  phase (columns), stacked bars of each distribution's top-1 share by the phase that owns the
  experts (the phase results' ``routing`` entries, ``eval/routing_analysis.py``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

ROUTING_PNG = "routing.png"


def _short(task: str) -> str:
  return task[len("lifelong_") :] if task.startswith("lifelong_") else task


def pct(value: float | None, digits: int = 2) -> str:
  """``0.0123`` -> ``"+1.23%"``; ``"-"`` for None / NaN."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{100 * value:+.{digits}f}%"


def _share(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


# ------------------------------------------------------------------------------- summaries
def expansion_change(
  before_eval: Mapping[str, Any], after_eval: Mapping[str, Any]
) -> dict[str, dict[str, float | None]]:
  """``{task: {"before", "after_expansion", "relative_change"}}`` (perplexities; change =
  ``after / before - 1``, None when ``before`` is missing)."""
  out = {}
  for task, values in after_eval.items():
    before = (before_eval.get(task) or {}).get("perplexity")
    after = values["perplexity"]
    out[task] = {
      "before": before,
      "after_expansion": after,
      "relative_change": after / before - 1.0 if before else None,
    }
  return out


def step0_summary(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any] | None]:
  """Per phase: ``expansion_change`` of its step-0 evaluation (None for phase 0 and for phases
  without ``eval_at_start``)."""
  out: list[dict[str, Any] | None] = []
  for i, r in enumerate(results):
    start = r.get("eval_at_start")
    out.append(expansion_change(results[i - 1]["eval"], start) if i and start else None)
  return out


# ------------------------------------------------------------------------------- markdown
def step0_table(report: Mapping[str, Any]) -> list[str]:
  """Markdown: per method, phase and distribution, perplexity before vs right after expansion."""
  rows = []
  for name, m in report["methods"].items():
    for phase, summary in zip(m["phases"], m.get("step0") or []):
      for task, c in (summary or {}).items():
        rows.append(
          [
            name,
            phase["phase"],
            _short(task),
            "-" if c["before"] is None else f"{c['before']:.2f}",
            f"{c['after_expansion']:.2f}",
            pct(c["relative_change"]),
          ]
        )
  if not rows:
    return []
  return _table(
    [
      "method",
      "phase",
      "distribution",
      "ppl end of previous phase",
      "ppl at step 0 (after expansion)",
      "change",
    ],
    rows,
  )


def routing_table(report: Mapping[str, Any]) -> list[str]:
  """Markdown: per method, phase and distribution, the % of its top-1 and top-k assignments that
  go to each phase's experts (mean over MoE layers)."""
  names = report["phase_names"]
  rows = []
  for name, m in report["methods"].items():
    for phase in m["phases"]:
      for task, entry in (phase.get("routing") or {}).items():
        rows.append(
          [name, phase["phase"], _short(task)]
          + [_share(entry["top1"].get(n)) for n in names]
          + [_share(entry["topk"].get(n)) for n in names]
        )
  if not rows:
    return []
  header = (
    ["method", "after", "distribution"]
    + [f"top-1 % {n}" for n in names]
    + [f"top-k % {n}" for n in names]
  )
  return _table(header, rows)


def markdown_sections(report: Mapping[str, Any]) -> list[str]:
  """The step-0 and routing sections of ``report.md`` (empty when neither was measured)."""
  lines: list[str] = []
  step0 = step0_table(report)
  if step0:
    lines += (
      [
        "## Right after expansion (step 0 of each phase)",
        "",
        "Validation perplexity at the end of the previous phase and on the phase's step-0 "
        "checkpoint (after the surgery, before any update); change = after / before - 1.",
        "",
      ]
      + step0
      + [""]
    )
  routing = routing_table(report)
  if routing:
    lines += (
      [
        "## Routing by owning phase",
        "",
        "Share (%) of each distribution's top-1 / top-k routing assignments (before "
        "capacity, mean over MoE layers) that go to the experts each phase added, after "
        "each phase.",
        "",
      ]
      + routing
      + ["", f"![routing by owning phase]({ROUTING_PNG})", ""]
    )
  return lines


# ------------------------------------------------------------------------------- figure
def routing_figure(report: Mapping[str, Any], plt: Any) -> Any | None:
  """Figure (methods x phases): stacked bars of each distribution's top-1 share by owning phase.

  Args:
    report: the report dict.
    plt: ``matplotlib.pyplot`` (Agg backend).
  Returns:
    The figure, or None when no phase has a routing entry.
  """
  methods = [
    (n, m) for n, m in report["methods"].items() if any(p.get("routing") for p in m["phases"])
  ]
  if not methods:
    return None
  names, tasks = report["phase_names"], report["eval_tasks"]
  cols = len(names)
  fig, axes = plt.subplots(
    len(methods),
    cols,
    squeeze=False,
    figsize=(1.0 + (0.5 * len(tasks) + 1.0) * cols, 0.8 + 2.4 * len(methods)),
  )
  colors = plt.get_cmap("tab10")
  for row, (name, m) in enumerate(methods):
    for col in range(cols):
      ax = axes[row][col]
      phase = m["phases"][col] if col < len(m["phases"]) else None
      routing = (phase or {}).get("routing") or {}
      if not routing:
        ax.axis("off")
        continue
      bottom = [0.0] * len(tasks)
      for k, owner in enumerate(names):
        heights = [100 * routing.get(t, {}).get("top1", {}).get(owner, 0.0) for t in tasks]
        ax.bar(
          range(len(tasks)),
          heights,
          bottom=bottom,
          color=colors(k % 10),
          label=f"experts of {owner}",
        )
        bottom = [b + h for b, h in zip(bottom, heights)]
      ax.set_ylim(0, 100)
      ax.set_xticks(range(len(tasks)), [_short(t) for t in tasks], fontsize=7, rotation=30)
      ax.tick_params(axis="y", labelsize=7)
      ax.set_title(f"{name}: after {phase['phase']}", fontsize=9)
      if col == 0:
        ax.set_ylabel("% of top-1 assignments", fontsize=8)
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors(k % 10)) for k in range(len(names))]
  fig.legend(
    handles, [f"experts of {n}" for n in names], loc="lower center", ncol=len(names), fontsize=8
  )
  fig.suptitle(
    "Top-1 routing of each distribution by the phase that owns the expert (mean over MoE layers)",
    fontsize=10,
  )
  fig.tight_layout(rect=(0.0, 0.06, 1.0, 1.0))
  return fig
