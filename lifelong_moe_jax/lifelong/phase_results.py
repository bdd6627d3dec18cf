"""Files of a lifelong run: the run identity, phase results, and their atomic JSON writes.

``MODEL_DIR/lifelong_run.json`` holds what must not change between invocations on one folder;
``<phase folder>/phase_result.json`` is written last when a phase is complete (its presence means
"skip this phase"). ``collect_results`` reads them back for the report.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Mapping

from lifelong_moe_jax.training import summaries

if TYPE_CHECKING:
  from lifelong_moe_jax.lifelong.phase_layout import RunLayout
  from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
  from lifelong_moe_jax.training.run import TrainResult

RESULT_FILE = "phase_result.json"
RUN_FILE = "lifelong_run.json"
RESULT_FORMAT_VERSION = 1


def jsonable(value: Any) -> Any:
  """``value`` as plain JSON types (numpy/jax scalars via ``.item()``, other objects as str)."""
  return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def write_json_atomic(path: str, value: Any) -> None:
  """Writes JSON to ``path`` via a temporary file and a rename (never a torn file)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(jsonable(value), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _without_defaults(
  identity: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
  out = dict(identity)
  for section, values in defaults.items():
    if isinstance(out.get(section), Mapping):
      out[section] = {k: v for k, v in out[section].items() if k not in values or v != values[k]}
  return out


def check_run_identity(
  model_dir: str,
  identity: Mapping[str, Any],
  defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
  """Refuses a MODEL_DIR whose ``lifelong_run.json`` differs from ``identity``.

  Args:
    model_dir: the run folder.
    identity: what must not change between invocations (``LifelongRunner.run_identity``).
    defaults: ``{section: {key: default}}``: in these sections an entry equal to its default counts
      as absent, so options added by a newer version (at their defaults) do not refuse older runs.
  Raises:
    ValueError: naming the differing keys and the file.
  """
  path = os.path.join(model_dir, RUN_FILE)
  if not os.path.exists(path):
    return
  defaults = jsonable(defaults or {})
  saved = _without_defaults(read_json(path), defaults)
  current = _without_defaults(jsonable(identity), defaults)
  diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if diffs:
    raise ValueError(
      f"{model_dir} holds a lifelong run with a different {', '.join(diffs)} (see "
      f"{path}). Use a new MODEL_DIR, or restore the original settings."
    )


def train_summary(metrics_path: str, start_step: int, end_step: int) -> tuple[dict, dict]:
  """``(train, timing)`` of a phase from its ``train/metrics.jsonl`` records in (start, end].

  ``train``: the last summary's ``loss`` and ``cross_entropy`` (reproducible); ``timing``: mean
  ``step_time`` and ``tokens_per_second`` over the phase's summaries (host wall clock).
  """
  records = [
    r for r in summaries.read_jsonl(metrics_path) if start_step < int(r.get("step", 0)) <= end_step
  ]
  records.sort(key=lambda r: int(r["step"]))
  train, timing = {}, {}
  if records:
    last = records[-1]
    train = {k: last[k] for k in ("loss", "cross_entropy", "accuracy") if k in last}
    train["step"] = int(last["step"])
    for key in ("step_time", "tokens_per_second"):
      values = [r[key] for r in records if key in r]
      if values:
        timing[key] = sum(values) / len(values)
  return train, timing


def phase_result(
  layout: RunLayout,
  method: str,
  index: int,
  *,
  num_params: int,
  evals: Mapping[str, Any],
  routing: Mapping[str, Any] | None,
  callbacks: Mapping[str, Any],
  record: PhaseRecord | None,
  start_entries: Mapping[str, Any] | None,
  train_result: TrainResult,
  walls: Mapping[str, float],
) -> dict[str, Any]:
  """The ``phase_result.json`` content of phase ``index`` of ``method`` (format
  ``RESULT_FORMAT_VERSION``; docs/lifelong_runner.md).

  Args:
    layout: the run's layout.
    method, index: the phase.
    num_params: parameters of the trained model.
    evals: ``{task: metrics}`` after the phase; routing: ``{task: entry}`` (None for dense).
    callbacks: ``{name: result}`` of the per-phase callbacks.
    record: the phase record (None for dense models).
    start_entries: the step-0 entries (``phase_analysis.start_entries``; None for phase 0).
    train_result: what ``training.run.train_model`` returned (teardown times, steps trained).
    walls: ``train_wall_s``, ``eval_wall_s`` and ``phase_wall_s`` of this invocation.
  """
  schedule, phase = layout.schedule, layout.schedule.phases[index]
  config = layout.config_for(method, index)
  train, timing = train_summary(
    os.path.join(layout.phase_dir(method, index), "train", "metrics.jsonl"),
    schedule.start_step(index),
    schedule.end_step(index),
  )
  timing.update(train_result.teardown)
  timing.update(walls)
  timing["trained_steps_this_invocation"] = int(train_result.state.step) - train_result.start_step
  out = {
    "format_version": RESULT_FORMAT_VERSION,
    "method": method,
    "trained_by": "shared" if layout.is_shared(method, index) else method,
    "phase_index": index,
    "phase": phase.name,
    "mixture": phase.mixture,
    "trained_on": layout.mixture_for(method, index),
    "steps": phase.steps,
    "start_step": schedule.start_step(index),
    "end_step": schedule.end_step(index),
    "num_experts": config.num_experts,
    "experts_per_layer": [config.num_experts] * config.num_moe_layers,
    "expert_slices": (
      {k: list(v) for k, v in record.expert_slices().items()} if record is not None else {}
    ),
    "num_params": num_params,
    "options": layout.options_for(method).to_dict(),
    "data_shards": layout.data_shards,
    "eval": dict(evals),
    "train": train,
    "callbacks": dict(callbacks),
    "timing": timing,
  }
  if routing:
    out["routing"] = routing
  out.update(start_entries or {})
  return out
