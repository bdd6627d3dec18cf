"""Figures of the lifelong report (matplotlib, Agg backend) and the atomic file writes.

``plot_forgetting`` (``forgetting.png``), ``plot_fewshot`` (``fewshot.png``) and
``plot_expert_usage`` (``expert_usage_<method>.png``) draw from the report dict that
``report.build_report`` makes; ``report.write_report`` calls them. Every report file (PNGs here,
``report.json`` / ``report.md`` there) is written through ``write_atomic``.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence


def short_task(task: str) -> str:
  """``lifelong_wiki_en`` -> ``wiki_en`` (display only)."""
  return task[len("lifelong_") :] if task.startswith("lifelong_") else task


def pyplot():
  """``matplotlib.pyplot`` with the non-interactive Agg backend (imported on first use)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def plot_forgetting(report: Mapping[str, Any], path: str) -> None:
  """One heatmap per method: validation perplexity of each distribution after each phase."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  plt = pyplot()
  methods = list(report["methods"].items())
  tasks = report["eval_tasks"]
  n = max(len(methods), 1)
  fig, axes = plt.subplots(
    1,
    n,
    figsize=(1.6 + 1.5 * len(report["phase_names"]) * n, 1.2 + 0.55 * len(tasks)),
    squeeze=False,
  )
  logs = [np.log(np.array([m["perplexity"][t] for t in tasks], dtype=float)) for _, m in methods]
  low = min(float(v.min()) for v in logs)
  high = max(max(float(v.max()) for v in logs), low + 1e-6)  # one color scale for all methods
  for ax, (name, m), log_values in zip(axes[0], methods, logs):
    phases = [p["phase"] for p in m["phases"]]
    ax.imshow(log_values, cmap="viridis_r", vmin=low, vmax=high, aspect="auto")
    for i in range(log_values.shape[0]):
      for j in range(log_values.shape[1]):
        light = (log_values[i, j] - low) / (high - low) < 0.4  # low perplexity: light yellow
        ax.text(
          j,
          i,
          f"{np.exp(log_values[i, j]):.1f}",
          ha="center",
          va="center",
          fontsize=8,
          color="black" if light else "white",
        )
    ax.set_xticks(range(len(phases)), [f"after\n{p}" for p in phases], fontsize=8)
    ax.set_yticks(range(len(tasks)), [short_task(t) for t in tasks], fontsize=8)
    ax.set_title(name, fontsize=10)
  fig.suptitle(
    "Validation perplexity after each phase (color: log scale, shared; light = lower)", fontsize=11
  )
  fig.tight_layout()
  save_png(fig, path, plt)


def plot_fewshot(report: Mapping[str, Any], path: str) -> bool:
  """One panel per few-shot task: score after each phase, one line per method, chance dashed with
  the band a uniform guesser falls in 95 % of the time (binomial, ``num_examples`` questions).
  False (nothing written) when no method has few-shot scores."""
  methods = [(name, m["fewshot"]) for name, m in report["methods"].items() if m.get("fewshot")]
  if not methods:
    return False
  plt = pyplot()
  tasks = list(dict.fromkeys(t for _, fs in methods for t in fs))
  phases = report["phase_names"]
  cols = min(len(tasks), 4)
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(0.8 + 3.0 * cols, 0.6 + 2.6 * rows), squeeze=False)
  for ax, task in zip([a for row in axes for a in row], tasks):
    entry = None
    for name, fs in methods:
      if task not in fs:
        continue
      entry = fs[task]
      points = [(i, v) for i, v in enumerate(entry["scores"]) if v is not None]
      ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=name)
    values = [v for _, fs in methods for v in fs.get(task, {}).get("scores", []) if v is not None]
    chance = entry.get("chance") if entry is not None else None
    if chance is not None:
      ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
      n = entry.get("num_examples")
      if n and 0.0 < chance < 100.0:
        half = 196.0 * math.sqrt(chance / 100.0 * (1.0 - chance / 100.0) / n)
        ax.axhspan(
          chance - half,
          chance + half,
          color="gray",
          alpha=0.15,
          linewidth=0,
          label="95% band of chance",
        )
      values.append(chance)
    if values:  # at least +-10 points around the data so that noise does not look like a trend
      low, high = min(values), max(values)
      pad = max(0.0, (20.0 - (high - low)) / 2)
      ax.set_ylim(max(0.0, low - pad - 2), min(100.0, high + pad + 2))
    ax.set_xticks(range(len(phases)), [f"after\n{p}" for p in phases], fontsize=7)
    ax.set_title(
      f"{task.removeprefix('fewshot_')} ({entry['metric'] if entry else ''})", fontsize=9
    )
    ax.tick_params(axis="y", labelsize=7)
  for ax in [a for row in axes for a in row][len(tasks) :]:
    ax.axis("off")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
  fig.suptitle("Few-shot score (%) after each phase", fontsize=11)
  fig.tight_layout(rect=(0.0, 0.08, 1.0, 1.0))
  save_png(fig, path, plt)
  return True


def plot_expert_usage(name: str, m: Mapping[str, Any], tasks: Sequence[str], path: str) -> bool:
  """Grid (MoE layer x phase) of heatmaps: fraction of each distribution's routing assignments
  per expert; dashed lines separate the expert slices of successive phases. False if dense."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  phases = [p for p in m["phases"] if p["experts_per_layer"]]
  if not phases:
    return False
  plt = pyplot()
  layers = len(phases[0]["experts_per_layer"])
  max_e = max(p["num_experts"] for p in phases)
  fig, axes = plt.subplots(
    layers,
    len(phases),
    squeeze=False,
    figsize=(2.2 + (0.35 * max_e + 0.6) * len(phases), 0.6 + (0.45 * len(tasks) + 0.6) * layers),
  )
  vmax = max(
    max(max(max(row) for row in p["eval"][t]["expert_usage"]) for t in tasks) for p in phases
  )
  image = None
  for col, p in enumerate(phases):
    bounds = sorted({v[1] for v in p.get("expert_slices", {}).values()})[:-1]
    for layer in range(layers):
      ax = axes[layer][col]
      usage = np.array([p["eval"][t]["expert_usage"][layer] for t in tasks], dtype=float)
      image = ax.imshow(usage, cmap="magma", vmin=0.0, vmax=max(vmax, 1e-6), aspect="auto")
      for b in bounds:
        ax.axvline(b - 0.5, color="cyan", linestyle="--", linewidth=1)
      ax.set_xticks(range(usage.shape[1]), [str(e) for e in range(usage.shape[1])], fontsize=7)
      ax.set_yticks(range(len(tasks)), [short_task(t) for t in tasks], fontsize=7)
      if layer == 0:
        ax.set_title(f"after {p['phase']}", fontsize=9)
      if col == 0:
        ax.set_ylabel(f"MoE layer {layer}", fontsize=8)
  fig.suptitle(f"{name}: share of each distribution's routing per expert", fontsize=10)
  fig.tight_layout(rect=(0.0, 0.0, 0.9, 1.0))
  fig.colorbar(image, cax=fig.add_axes((0.92, 0.15, 0.015, 0.7)), label="share of assignments")
  save_png(fig, path, plt)
  return True


def save_png(fig, path: str, plt) -> None:
  """Writes ``fig`` to ``path`` as a PNG (atomically, ``write_atomic``), then closes it."""
  try:
    write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
  finally:
    plt.close(fig)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temporaries(path: str) -> list[str]:
  """Removes the temporary files ``write_atomic`` left beside ``path`` in a process that was
  killed (their names carry the writer's pid; files of live writers are kept); returns them."""
  folder, base = os.path.dirname(path) or ".", os.path.basename(path)
  removed = []
  for name in os.listdir(folder) if os.path.isdir(folder) else ():
    if not (name.startswith(f".{base}.") and name.endswith(".tmp")):
      continue
    pid = name[len(base) + 2 :].split(".", 1)[0]
    if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
      continue
    try:
      os.remove(os.path.join(folder, name))
      removed.append(name)
    except FileNotFoundError:
      pass
  return removed


def write_atomic(path: str, write: Callable[[Any], None], *, binary: bool = False) -> None:
  """Writes ``path`` through ``write(file)`` into a temporary file beside it, then renames it, so a
  reader (or a crash) never sees a partial file; the temporary file is removed on failure, and
  one a killed writer left is removed by the next write of ``path``."""
  remove_stale_temporaries(path)
  fd, tmp = tempfile.mkstemp(
    prefix=f".{os.path.basename(path)}.{os.getpid()}.",
    suffix=".tmp",
    dir=os.path.dirname(path) or ".",
  )
  try:
    with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
