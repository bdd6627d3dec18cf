"""The lifelong report: ``report.json`` (schema in docs/lifelong_runner.md), ``report.md`` and PNGs.

``build_report`` turns the per-phase results of every method into one JSON-able dict; it is a pure
function of those results, so a run interrupted and resumed yields the same report as an
uninterrupted one (apart from the ``timing`` entries, which measure wall-clock time).
``write_report`` writes ``report.json``, ``report.md``, ``forgetting.png``, ``fewshot.png`` (when
few-shot scores exist), ``routing.png`` (when routing was analysed) and one
``expert_usage_<method>.png`` per MoE method, each atomically (the figures are drawn by
``report_plots.py``).

Forgetting of a distribution = perplexity after the last completed phase minus perplexity right
after the last phase that trained on it (positive = forgot); relative forgetting = the same as a
percentage of the latter. Distributions never trained on have no forgetting value. The step-0 and
routing sections (and ``routing.png``) come from ``analysis_report.py``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from lifelong_moe_jax.lifelong import analysis_report
from lifelong_moe_jax.lifelong import claims
from lifelong_moe_jax.lifelong.report_plots import (
  plot_expert_usage,
  plot_fewshot,
  plot_forgetting,
  pyplot,
  save_png,
  short_task,
  write_atomic,
)

REPORT_FORMAT_VERSION = 1
TIMING_KEY = "timing"
REPORT_JSON, REPORT_MD, FORGETTING_PNG = "report.json", "report.md", "forgetting.png"
FEWSHOT_PNG = "fewshot.png"


def usage_png_name(method: str) -> str:
  return f"expert_usage_{method}.png"


# ------------------------------------------------------------------------------- building
def _own_phase(task: str, phase_tasks: Sequence[Sequence[str]], upto: int) -> int | None:
  """Index of the last phase <= ``upto`` whose data holds ``task`` (None: never trained)."""
  own = None
  for i, tasks in enumerate(phase_tasks[: upto + 1]):
    if task in tasks:
      own = i
  return own


FEWSHOT_METRICS = ("accuracy", "exact_match", "f1", "accuracy_norm")


def fewshot_summary(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """``{task: {"metric", "chance", "scores": [per phase, None where missing]}}`` from the phases'
  ``callbacks.fewshot`` results (the task's ``primary_metric`` when recorded, else the first of
  FEWSHOT_METRICS it reports; ``num_shots`` and ``num_examples`` when recorded); {} if none."""
  tasks: dict[str, dict[str, Any]] = {}
  for r in results:
    for task, values in ((r.get("callbacks") or {}).get("fewshot") or {}).items():
      metric = values.get("primary_metric")
      if metric not in values:
        metric = next((m for m in FEWSHOT_METRICS if m in values), None)
      if metric is not None and task not in tasks:
        tasks[task] = {"metric": metric, "chance": values.get("chance")}
        for key in ("num_shots", "num_examples"):
          if key in values:
            tasks[task][key] = values[key]
  for task, entry in tasks.items():
    entry["scores"] = [
      ((r.get("callbacks") or {}).get("fewshot") or {}).get(task, {}).get(entry["metric"])
      for r in results
    ]
  return tasks


def method_summary(
  results: Sequence[Mapping[str, Any]],
  eval_tasks: Sequence[str],
  phase_tasks: Sequence[Sequence[str]],
) -> dict[str, Any]:
  """Per-method matrices and forgetting from its phase results (in phase order)."""
  perplexity = {t: [r["eval"][t]["perplexity"] for r in results] for t in eval_tasks}
  loss = {t: [r["eval"][t]["loss"] for r in results] for t in eval_tasks}
  last = len(results) - 1
  forgetting: dict[str, float | None] = {}
  relative: dict[str, float | None] = {}
  after_own: dict[str, float | None] = {}
  for t in eval_tasks:
    own = _own_phase(t, phase_tasks, last)
    after_own[t] = None if own is None else perplexity[t][own]
    forgetting[t] = None if own is None else perplexity[t][last] - perplexity[t][own]
    relative[t] = None if own is None else 100.0 * (perplexity[t][last] / perplexity[t][own] - 1.0)
  final = {t: perplexity[t][last] for t in eval_tasks}
  trained = [v for v in forgetting.values() if v is not None]
  trained_relative = [v for v in relative.values() if v is not None]
  return {
    "phases_completed": len(results),
    "perplexity": perplexity,
    "loss": loss,
    "perplexity_after_own_phase": after_own,
    "forgetting": forgetting,
    "final_perplexity": final,
    "mean_final_perplexity": sum(final.values()) / len(final) if final else None,
    "mean_forgetting": sum(trained) / len(trained) if trained else None,
    "relative_forgetting": relative,
    "mean_relative_forgetting": (
      sum(trained_relative) / len(trained_relative) if trained_relative else None
    ),
    "final_token_weighted_nll": claims.token_weighted_nll(results[last]["eval"], eval_tasks),
    "step0": analysis_report.step0_summary(results),
    "experts_per_layer": [r["experts_per_layer"] for r in results],
    "fewshot": fewshot_summary(results),
  }


def build_report(
  *,
  schedule: Mapping[str, Any],
  model_config: Mapping[str, Any],
  options: Mapping[str, Any],
  eval_tasks: Sequence[str],
  phase_tasks: Sequence[Sequence[str]],
  results: Mapping[str, Sequence[Mapping[str, Any]]],
  method_specs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
  """The report dict (see docs/lifelong_runner.md for the schema).

  Args:
    schedule: ``LifelongSchedule.to_dict()``.
    model_config: the base ``ModelConfig`` as a dict.
    options: ``MethodOptions.to_dict()``.
    eval_tasks: tasks evaluated after every phase (rows of the matrices).
    phase_tasks: per schedule phase, the tasks of its mixture (for "own phase").
    results: ``{method: [phase result, ...]}`` in phase order (possibly incomplete).
    method_specs: ``{method: Method.to_dict()}`` (descriptions for the report).
  """
  num_phases = len(schedule["phases"])
  methods = {}
  for name, phases in results.items():
    methods[name] = {
      "spec": dict((method_specs or {}).get(name) or {}) or None,
      "complete": len(phases) == num_phases,
      "phases": [{k: v for k, v in r.items() if k != "format_version"} for r in phases],
      **method_summary(phases, eval_tasks, phase_tasks),
    }
  return {
    "format_version": REPORT_FORMAT_VERSION,
    "schedule": dict(schedule),
    "model_config": dict(model_config),
    "options": dict(options),
    "eval_tasks": list(eval_tasks),
    "phase_tasks": [list(t) for t in phase_tasks],
    "phase_names": [p["name"] for p in schedule["phases"]],
    "methods": methods,
  }


def without_timing(report: Any) -> Any:
  """The report with every ``timing`` entry removed (what must be reproducible)."""
  if isinstance(report, Mapping):
    return {k: without_timing(v) for k, v in report.items() if k != TIMING_KEY}
  if isinstance(report, list):
    return [without_timing(v) for v in report]
  return report


# ------------------------------------------------------------------------------- markdown
def _fmt(value: float | None, digits: int = 2) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if abs(value) >= 1e5:
    return f"{value:.3g}"
  return f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
  return "-" if value is None else f"{value:+.2f}"


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{value:+.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def comparison_table(report: Mapping[str, Any]) -> list[str]:
  """Markdown: per method, final perplexity of every distribution, forgetting, step time."""
  tasks = report["eval_tasks"]
  header = (
    ["method", "phases"]
    + [f"{short_task(t)} ppl" for t in tasks]
    + [
      "mean ppl",
      "mean forgetting",
      "mean rel. forgetting",
      "token-weighted NLL",
      "experts/layer",
      "s/step per phase",
    ]
  )
  rows = []
  for name, m in report["methods"].items():
    step_times = [p.get(TIMING_KEY, {}).get("step_time") for p in m["phases"]]
    experts = m["experts_per_layer"][-1]
    rows.append(
      [name, str(m["phases_completed"])]
      + [_fmt(m["final_perplexity"][t]) for t in tasks]
      + [
        _fmt(m["mean_final_perplexity"]),
        _signed(m["mean_forgetting"]),
        _percent(m.get("mean_relative_forgetting")),
        _fmt(m.get("final_token_weighted_nll"), 4),
        str(experts[0]) if experts else "dense",
        " / ".join(_fmt(s, 3) for s in step_times),
      ]
    )
  return _table(header, rows)


def headline_table(report: Mapping[str, Any]) -> list[str]:
  """Markdown: the first phase's distributions right after their phase and at the end (forgetting),
  the last phase's distributions at the end (learning the new data), and the step time per phase."""
  first, last = report["phase_tasks"][0], report["phase_tasks"][-1]
  names = report["phase_names"]
  header = ["method"]
  for t in first:
    header += [f"{short_task(t)} after {names[0]}", f"{short_task(t)} at end", "forgetting"]
  header += [f"{short_task(t)} at end" for t in last if t not in first]
  header += ["s/step per phase"]
  rows = []
  for name, m in report["methods"].items():
    row = [name]
    for t in first:
      row += [
        _fmt(m["perplexity"][t][0]),
        _fmt(m["final_perplexity"][t]),
        _signed(m["forgetting"][t]),
      ]
    row += [_fmt(m["final_perplexity"][t]) for t in last if t not in first]
    row += [" / ".join(_fmt(p.get(TIMING_KEY, {}).get("step_time"), 3) for p in m["phases"])]
    rows.append(row)
  return _table(header, rows)


def forgetting_table(name: str, m: Mapping[str, Any], report: Mapping[str, Any]) -> list[str]:
  """Markdown: perplexity of each distribution (rows) after each phase (columns) + forgetting."""
  tasks = report["eval_tasks"]
  phases = [p["phase"] for p in m["phases"]]
  header = ["distribution"] + [f"after {p}" for p in phases] + ["forgetting", "rel. forgetting"]
  rows = []
  for t in tasks:
    own = _own_phase(t, report["phase_tasks"], len(phases) - 1)
    cells = []
    for i, v in enumerate(m["perplexity"][t]):
      cell = _fmt(v)
      cells.append(f"**{cell}**" if i == own else cell)
    rows.append(
      [short_task(t)]
      + cells
      + [_signed(m["forgetting"][t]), _percent((m.get("relative_forgetting") or {}).get(t))]
    )
  return _table(header, rows)


def fewshot_table(report: Mapping[str, Any]) -> list[str]:
  """Markdown: few-shot score of every task after every phase, per method (empty if none)."""
  names = report["phase_names"]
  rows = []
  for name, m in report["methods"].items():
    for task, entry in m.get("fewshot", {}).items():
      scores = entry["scores"] + [None] * (len(names) - len(entry["scores"]))
      rows.append(
        [name, task, str(entry.get("num_shots", "?")), entry["metric"], _fmt(entry["chance"], 1)]
        + [_fmt(v, 1) for v in scores]
      )
  if not rows:
    return []
  return _table(["method", "task", "k", "metric", "chance"] + [f"after {n}" for n in names], rows)


def timing_table(report: Mapping[str, Any]) -> list[str]:
  header = ["method", "phase", "experts/layer", "s/step", "tokens/s", "train wall s", "eval wall s"]
  rows = []
  for name, m in report["methods"].items():
    for p in m["phases"]:
      t = p.get(TIMING_KEY, {})
      experts = p["experts_per_layer"]
      rows.append(
        [
          name,
          p["phase"],
          str(experts[0]) if experts else "dense",
          _fmt(t.get("step_time"), 3),
          _fmt(t.get("tokens_per_second"), 0),
          _fmt(t.get("train_wall_s"), 1),
          _fmt(t.get("eval_wall_s"), 1),
        ]
      )
  return _table(header, rows)


def render_markdown(report: Mapping[str, Any]) -> str:
  """``report.md``: schedule, comparison, per-method forgetting matrices, timing, figures."""
  sched = report["schedule"]
  lines = ["# Lifelong pretraining report", ""]
  lines += ["## Schedule", ""]
  lines += _table(
    ["#", "phase", "mixture", "steps", "add experts"],
    [
      [str(i), p["name"], p["mixture"], str(p["steps"]), str(p["add_experts"])]
      for i, p in enumerate(sched["phases"])
    ],
  )
  lines += [
    "",
    f"Batch {sched['batch_size']} x {sched['task_feature_lengths']}, "
    f"seed {sched['seed']}; evaluation: up to {sched['eval_max_batches']} validation "
    f"batches of {sched['eval_batch_size']} per distribution.",
    "",
  ]
  lines += ["## Headline", ""]
  lines += [
    "Validation perplexity of the first phase's data right after its phase and at the end, "
    "of the last phase's data at the end, and train step time per phase.",
    "",
  ]
  lines += headline_table(report) + [""]
  lines += ["## Comparison after the last completed phase", ""]
  lines += [
    "Validation perplexity (lower is better); forgetting = perplexity after the last "
    "phase minus perplexity right after the distribution's own phase (rel.: in % of the "
    "latter, mean over distributions trained so far); token-weighted NLL = mean loss per "
    "token over every distribution after the last phase.",
    "",
  ]
  lines += comparison_table(report) + [""]
  for name, m in report["methods"].items():
    spec = m.get("spec") or {}
    lines += [f"## {name}", "", spec.get("description", ""), ""]
    lines += ["Validation perplexity after each phase (bold: right after its own phase).", ""]
    lines += forgetting_table(name, m, report) + [""]
  fewshot = fewshot_table(report)
  if fewshot:
    lines += [
      "## Few-shot scores after each phase",
      "",
      "Scores in percent (higher is better) beside the task's chance level.",
      "",
    ]
    lines += fewshot + [""]
  lines += analysis_report.markdown_sections(report)
  lines += ["## Train step time per phase", ""]
  lines += [
    "Host wall clock, compile time excluded. Lifelong-MoE's promise is a constant cost "
    "per step while experts are added (top-k routing).",
    "",
  ]
  lines += timing_table(report) + [""]
  lines += ["## Figures", "", f"![forgetting matrix]({FORGETTING_PNG})", ""]
  if fewshot:
    lines += [f"![few-shot scores after each phase]({FEWSHOT_PNG})", ""]
  for name, m in report["methods"].items():
    if any(m["experts_per_layer"]):
      lines += [f"![expert usage of {name}]({usage_png_name(name)})", ""]
  return "\n".join(lines)


# ------------------------------------------------------------------------------- writing
def write_report(model_dir: str, report: Mapping[str, Any]) -> dict[str, str]:
  """Writes report.json, report.md and the PNGs into ``model_dir``; returns their paths.

  Every file is written to a temporary name beside it and renamed when complete (``write_atomic``),
  so an interrupted write leaves the previous version, never a torn file.
  """
  os.makedirs(model_dir, exist_ok=True)
  paths = {"json": os.path.join(model_dir, REPORT_JSON), "md": os.path.join(model_dir, REPORT_MD)}
  for key, text in (
    ("json", json.dumps(report, indent=2, sort_keys=True) + "\n"),
    ("md", render_markdown(report) + "\n"),
  ):
    write_atomic(paths[key], lambda f, text=text: f.write(text))
  if report["methods"]:
    paths["forgetting_png"] = os.path.join(model_dir, FORGETTING_PNG)
    plot_forgetting(report, paths["forgetting_png"])
    fewshot_path = os.path.join(model_dir, FEWSHOT_PNG)
    if plot_fewshot(report, fewshot_path):
      paths["fewshot_png"] = fewshot_path
    plt = pyplot()
    routing_fig = analysis_report.routing_figure(report, plt)
    if routing_fig is not None:
      paths["routing_png"] = os.path.join(model_dir, analysis_report.ROUTING_PNG)
      save_png(routing_fig, paths["routing_png"], plt)
    for name, m in report["methods"].items():
      path = os.path.join(model_dir, usage_png_name(name))
      if plot_expert_usage(name, m, report["eval_tasks"], path):
        paths[f"usage_png_{name}"] = path
  return paths


def load_report(model_dir: str) -> dict[str, Any]:
  with open(os.path.join(model_dir, REPORT_JSON), encoding="utf-8") as f:
    return json.load(f)
