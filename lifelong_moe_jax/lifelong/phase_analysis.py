"""Measurements of a lifelong phase besides its final evaluation: step 0 and routing.

* **Step-0 evaluation.** For a phase ``i > 0`` every distribution is evaluated on the phase's step-0
  checkpoint (built by ``phase_start.build_phase_start``: right after the surgery, before any
  update), once: the result is saved as ``<phase folder>/step0_eval.json`` (atomic; a resumed phase
  reuses it) and goes into the phase result as ``eval_at_start`` (same schema as ``eval``) and
  ``routing_at_start``. When training's checkpoint rotation already deleted the step-0 checkpoint
  (a phase interrupted before this file existed), it is rebuilt in memory: the surgery is
  deterministic (seeded by the schedule), so expanding the previous phase's final checkpoint again
  into a temporary folder gives the same params.
* **Routing.** ``phase_routing`` turns a ``PhaseEvaluator`` result into ``{task: routing entry}``
  by the phase record's expert slices (``eval/routing_analysis.py``).
* **Backfill.** ``backfill`` adds the missing ``routing`` and ``eval_at_start`` entries to phases
  completed before these measurements existed, from their checkpoints, and rewrites their
  ``phase_result.json`` atomically (``run_lifelong --report_only --backfill_analysis``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import phase_eval
from lifelong_moe_jax.eval import routing_analysis
from lifelong_moe_jax.lifelong import analysis_report
from lifelong_moe_jax.lifelong import checkpoint_expansion
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import phase_start
from lifelong_moe_jax.lifelong.phase_layout import LayoutError, RunLayout
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord, record_from_metadata
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.training import optimizers

PyTree = Any
STEP0_FILE = "step0_eval.json"
REBUILD_DIR = ".step0_rebuild"
EvaluatorFn = Callable[[lm.LanguageModel], phase_eval.PhaseEvaluator]


def _primary() -> bool:
  return jax.process_index() == 0


# ------------------------------------------------------------------------------- routing
def phase_routing(
  evals: Mapping[str, Mapping[str, Any]], record: PhaseRecord | None
) -> dict[str, Any] | None:
  """``{task: routing entry}`` of a phase evaluation (None for dense models / no record)."""
  if record is None:
    return None
  return routing_analysis.from_evaluation(evals, record.expert_slices()) or None


def log_routing(method: str, when: str, routing: Mapping[str, Any] | None) -> None:
  """One line per distribution: its top-1 and top-k shares by owning phase."""
  for task, entry in (routing or {}).items():
    logging.info(
      "[%s] routing %s | %s | top-1 by phase: %s | top-k: %s",
      method,
      when,
      task,
      routing_analysis.format_shares(entry["top1"]),
      routing_analysis.format_shares(entry["topk"]),
    )


# ------------------------------------------------------------------------------- step 0
def step0_params(
  layout: RunLayout,
  partitioner: partitioning.Partitioner,
  optimizer: optimizers.Optimizer,
  data_dir: str | None,
  method: str,
  index: int,
  model: lm.LanguageModel,
) -> PyTree:
  """The params of phase ``index``'s step-0 checkpoint (rebuilt if rotation deleted it)."""
  pdir, step = layout.phase_dir(method, index), layout.schedule.start_step(index)
  try:
    step_dir = checkpoints.resolve_step_dir(pdir, step=step)
  except checkpoints.CheckpointNotFoundError:
    step_dir = None
  if step_dir is not None:
    return checkpoints.restore_model_params(step_dir, model, partitioner)
  tmp = os.path.join(pdir, REBUILD_DIR)
  logging.info(
    "[%s] phase %d: step-0 checkpoint %d no longer in %s; rebuilding it in %s.",
    method,
    index,
    step,
    pdir,
    tmp,
  )
  if _primary():
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  checkpoint_expansion.sync_processes(f"step0-rebuild-{pdir}")
  try:
    start = os.path.join(tmp, "start")
    phase_start.build_phase_start(
      layout, partitioner, optimizer, data_dir, method, index, destination=start
    )
    return checkpoints.restore_model_params(checkpoints.resolve_step_dir(start), model, partitioner)
  finally:
    checkpoint_expansion.sync_processes(f"step0-rebuilt-{pdir}")
    if _primary():
      shutil.rmtree(tmp, ignore_errors=True)


def step0_evaluation(
  layout: RunLayout,
  partitioner: partitioning.Partitioner,
  optimizer: optimizers.Optimizer,
  data_dir: str | None,
  method: str,
  index: int,
  evaluator: phase_eval.PhaseEvaluator,
  record: PhaseRecord | None,
) -> dict[str, Any]:
  """Phase ``index``'s step-0 evaluation, computed once and kept in ``step0_eval.json``.

  Args:
    layout / partitioner / optimizer / data_dir: the run's.
    method, index: the phase (``index > 0``).
    evaluator: a ``PhaseEvaluator`` of the phase's model (every distribution).
    record: the phase record at the phase start (for the routing; None for dense models).
  Returns:
    ``{"step", "eval": {task: metrics}, "routing": {task: entry}}`` (no routing when dense).
  """
  path = os.path.join(layout.phase_dir(method, index), STEP0_FILE)
  if os.path.exists(path):
    return phase_results.read_json(path)
  params = step0_params(layout, partitioner, optimizer, data_dir, method, index, evaluator.model)
  evals = evaluator.evaluate(params)
  del params
  out: dict[str, Any] = {"step": layout.schedule.start_step(index), "eval": evals}
  routing = phase_routing(evals, record)
  if routing:
    out["routing"] = routing
  if _primary():
    phase_results.write_json_atomic(path, out)
  checkpoint_expansion.sync_processes(f"step0-eval-{path}")
  return phase_results.jsonable(out)


def start_entries(start: Mapping[str, Any]) -> dict[str, Any]:
  """The phase-result entries of a step-0 evaluation: ``eval_at_start`` (+ ``routing_at_start``)."""
  out = {"eval_at_start": start["eval"]}
  if start.get("routing"):
    out["routing_at_start"] = start["routing"]
  return out


def log_step0(
  method: str, phase: str, previous_eval: Mapping[str, Any] | None, eval_at_start: Mapping[str, Any]
) -> None:
  """One line per distribution: perplexity at the end of the previous phase -> at step 0."""
  change = analysis_report.expansion_change(previous_eval or {}, eval_at_start)
  for task, values in eval_at_start.items():
    c = change.get(task) or {}
    before = c.get("before")
    logging.info(
      "[%s] step 0 of %s (after expansion) | %s | perplexity %s -> %.2f (%s)",
      method,
      phase,
      task,
      "?" if before is None else f"{before:.2f}",
      values["perplexity"],
      analysis_report.pct(c.get("relative_change")),
    )


# ------------------------------------------------------------------------------- backfill
def _warn_if_different(
  method: str, index: int, saved: Mapping[str, Any], evals: Mapping[str, Any]
) -> None:
  for task, values in evals.items():
    old = (saved.get(task) or {}).get("loss")
    if old is not None and not np.isclose(old, values["loss"], rtol=1e-5, atol=1e-6):
      logging.warning(
        "[%s] phase %d: re-evaluated %s loss %.6f differs from the saved %.6f.",
        method,
        index,
        task,
        values["loss"],
        old,
      )


def _backfill_routing(
  layout: RunLayout,
  partitioner: partitioning.Partitioner,
  method: str,
  index: int,
  evaluator: phase_eval.PhaseEvaluator,
  result: dict[str, Any],
) -> bool:
  """Re-evaluates the phase's final checkpoint and adds ``routing`` (and ``expert_usage_top1``) to
  ``result``; False for a dense model."""
  step_dir = layout.final_step_dir(method, index)
  record = record_from_metadata(checkpoints.read_metadata(step_dir))
  if record is None:
    return False
  params = checkpoints.restore_model_params(step_dir, evaluator.model, partitioner)
  evals = evaluator.evaluate(params)
  del params
  _warn_if_different(method, index, result.get("eval", {}), evals)
  routing = phase_routing(evals, record)
  if not routing:
    return False
  result["routing"] = routing
  for task, values in evals.items():
    if task in result.get("eval", {}) and "expert_usage_top1" in values:
      result["eval"][task]["expert_usage_top1"] = values["expert_usage_top1"]
  log_routing(method, f"after {layout.schedule.phases[index].name} (backfill)", routing)
  return True


def backfill(
  layout: RunLayout,
  partitioner: partitioning.Partitioner,
  optimizer: optimizers.Optimizer,
  data_dir: str | None,
  methods: Sequence[str],
  evaluator_for: EvaluatorFn,
) -> list[str]:
  """Adds missing ``routing`` / ``eval_at_start`` entries to completed phases of ``methods``.

  Args:
    layout / partitioner / optimizer / data_dir: the run's.
    methods: methods whose completed phases are checked.
    evaluator_for: ``fn(model) -> PhaseEvaluator`` over every distribution of the run.
  Returns:
    The ``phase_result.json`` paths rewritten.
  """
  updated: list[str] = []
  for method in methods:
    for index in range(len(layout.schedule.phases)):
      pdir = layout.phase_dir(method, index)
      path = layout.result_path(method, index)
      if not os.path.exists(path):
        break
      result = phase_results.read_json(path)
      config = layout.config_for(method, index)
      need_routing = config.is_moe and "routing" not in result
      need_start = index > 0 and "eval_at_start" not in result
      if not (need_routing or need_start):
        continue
      evaluator = evaluator_for(lm.LanguageModel(config))
      changed = False
      if need_routing:
        try:
          changed |= _backfill_routing(layout, partitioner, method, index, evaluator, result)
        except (LayoutError, checkpoints.CheckpointNotFoundError) as e:
          logging.warning("[%s] phase %d: no routing backfill (%s).", method, index, e)
      if need_start:
        try:
          record = phase_start.record_at_start(layout, method, index)
          start = step0_evaluation(
            layout, partitioner, optimizer, data_dir, method, index, evaluator, record
          )
        except (LayoutError, checkpoints.CheckpointNotFoundError) as e:
          logging.warning("[%s] phase %d: no step-0 backfill (%s).", method, index, e)
        else:
          result.update(start_entries(start))
          changed = True
          previous = layout.result_path(method, index - 1)
          log_step0(
            method,
            layout.schedule.phases[index].name,
            phase_results.read_json(previous).get("eval") if os.path.exists(previous) else None,
            result["eval_at_start"],
          )
      if not changed:
        continue
      if _primary():
        phase_results.write_json_atomic(path, result)
      checkpoint_expansion.sync_processes(f"backfill-{path}")
      updated.append(path)
      logging.info("[%s] phase %d: backfilled %s.", method, index, path)
  return updated
