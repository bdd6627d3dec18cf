"""One lifelong phase from start to result (``LifelongRunner.run_phase``).

``run_phase(runner, method, index)``, for phase ``index`` of ``method``:

1. ``phase_result.json`` exists -> the phase is complete: its result is returned (refused when the
   method's options changed since, ``completed_result``).
2. ``index > 0``: the step-0 checkpoint is built once (``phase_start.build_phase_start``) and
   evaluated once (``phase_analysis.step0_evaluation``); the method builds its regularizers and
   optimizer wrapper (``phase_start.phase_setup``).
3. ``train``: ``training.run.train_model`` on the runner's mesh and input shards, resuming from
   the phase folder's latest checkpoint.
4. ``evaluate``: every distribution of the run (loss, perplexity, expert usage, routing by
   owning phase) and the per-phase callbacks (few-shot, harness).
5. The result (``phase_results.phase_result``) is written by process 0, then every process
   waits for the others.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from absl import logging
import jax

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import param_tree
from lifelong_moe_jax.lifelong import checkpoint_expansion
from lifelong_moe_jax.lifelong import method_options
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong import phase_analysis
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import phase_start
from lifelong_moe_jax.lifelong.phase_callbacks import PhaseContext
from lifelong_moe_jax.lifelong.phase_layout import RunLayout
from lifelong_moe_jax.lifelong.phase_record import METADATA_KEY, PhaseRecord
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.training import run as run_lib
from lifelong_moe_jax.training import summaries
from lifelong_moe_jax.training import train_state as ts

if TYPE_CHECKING:
  from lifelong_moe_jax.lifelong.runner import LifelongRunner

PyTree = Any


class LifelongError(ValueError):
  """A lifelong run cannot proceed (inconsistent folder, schedule or checkpoint)."""


def completed_result(layout: RunLayout, method: str, index: int) -> dict[str, Any] | None:
  """The result of phase ``index`` of ``method`` when it is complete, else None.

  Raises:
    LifelongError: the phase was trained (not shared) with other method options or on another
      mixture than now (e.g. a variant name reused with ``replay`` toggled).
  """
  pdir = layout.phase_dir(method, index)
  path = layout.result_path(method, index)
  if not os.path.exists(path):
    return None
  done = phase_results.read_json(path)
  options = layout.options_for(method).to_dict()
  # Fields a result recorded by an older version lacks ran with their legacy values.
  before = {**method_options.LEGACY_OPTION_VALUES, **done.get("options", options)}
  changed = sorted(k for k in options if before.get(k, options[k]) != options[k])
  if changed and not layout.is_shared(method, index):
    was = ", ".join(f"{k}={before[k]!r}" for k in changed)
    now = ", ".join(f"{k}={options[k]!r}" for k in changed)
    raise LifelongError(
      f"[{method}] phase {index} ({layout.schedule.phases[index].name}) in {pdir} was trained "
      f"with other method options ({was}; now {now}). Use a new method variant name "
      "(RunnerConfig.method_variants) or another MODEL_DIR."
    )
  trained_on, now_on = done.get("trained_on"), layout.mixture_for(method, index)
  if trained_on and trained_on != now_on and not layout.is_shared(method, index):
    raise LifelongError(
      f"[{method}] phase {index} ({layout.schedule.phases[index].name}) in {pdir} was trained "
      f"on {trained_on!r}, the method now trains on {now_on!r} (its replay or joint data "
      "changed). Use a new method variant name (RunnerConfig.method_variants) or another "
      "MODEL_DIR."
    )
  logging.info(
    "[%s] phase %d (%s) already complete: %s",
    method,
    index,
    layout.schedule.phases[index].name,
    pdir,
  )
  return done


def previous_eval(layout: RunLayout, method: str, index: int) -> dict[str, Any] | None:
  """The evaluation after phase ``index - 1`` (None when its result is missing)."""
  path = layout.result_path(method, index - 1)
  return phase_results.read_json(path).get("eval") if os.path.exists(path) else None


def run_phase(runner: LifelongRunner, method: str, index: int) -> dict[str, Any]:
  """Trains and evaluates one phase (resuming or skipping as the folder says); returns its result."""
  layout = runner.layout
  done = completed_result(layout, method, index)
  if done is not None:
    return done
  schedule, phase = layout.schedule, layout.schedule.phases[index]
  config = layout.config_for(method, index)
  logging.info(
    "[%s] ===== phase %d/%d %s: %s, steps %d..%d, %s =====",
    method,
    index + 1,
    len(schedule.phases),
    phase.name,
    layout.mixture_for(method, index),
    schedule.start_step(index),
    schedule.end_step(index),
    f"{config.num_experts} experts per MoE layer" if config.is_moe else "dense",
  )
  t_start = time.perf_counter()
  optimizer = runner.optimizer_for(method)
  previous_params = (
    phase_start.build_phase_start(
      layout, runner.partitioner, optimizer, runner.data_dir, method, index
    )
    if index > 0
    else None
  )
  record = phase_start.record_at_start(layout, method, index)
  model = lm.LanguageModel(config)
  evaluator = runner.evaluator(model)
  start, regularizers, wrapper = None, [], None
  if index > 0:  # every distribution on the step-0 checkpoint (after surgery, before updates)
    start = phase_analysis.step0_evaluation(
      layout, runner.partitioner, optimizer, runner.data_dir, method, index, evaluator, record
    )
    phase_analysis.log_step0(
      method, phase.name, previous_eval(layout, method, index), start["eval"]
    )
    phase_analysis.log_routing(method, f"at step 0 of {phase.name}", start.get("routing"))
    setup = phase_start.phase_setup(
      layout, runner.partitioner, runner.data_dir, method, index, record, previous_params
    )
    method_obj = methods_lib.get_method(method)
    regularizers, wrapper = method_obj.regularizers(setup), method_obj.optimizer_wrapper(setup)
  del previous_params
  t_train = time.perf_counter()
  result = train(runner, method, index, model, regularizers, wrapper, record)
  train_wall = time.perf_counter() - t_train
  logging.info(
    "[%s] phase %d (%s) trained in %s; evaluating %d distributions.",
    method,
    index,
    phase.name,
    summaries.format_duration(train_wall),
    len(runner.eval_tasks),
  )
  params = result.state.params
  if record is not None:
    record.validate_expert_counts(param_tree.expert_counts(params, result.trainer.params_axes))
  t_eval = time.perf_counter()
  evals, routing, callback_results = evaluate(
    runner, method, index, model, params, evaluator, record
  )
  out = phase_results.phase_result(
    layout,
    method,
    index,
    num_params=ts.param_count(params),
    evals=evals,
    routing=routing,
    callbacks=callback_results,
    record=record,
    start_entries=phase_analysis.start_entries(start) if start is not None else None,
    train_result=result,
    walls={
      "train_wall_s": train_wall,
      "eval_wall_s": time.perf_counter() - t_eval,
      "phase_wall_s": time.perf_counter() - t_start,
    },
  )
  if jax.process_index() == 0:
    phase_results.write_json_atomic(layout.result_path(method, index), out)
  checkpoint_expansion.sync_processes(f"phase-done-{method}-{index}")
  return out


def train(
  runner: LifelongRunner,
  method: str,
  index: int,
  model: lm.LanguageModel,
  regularizers: list[Any],
  wrapper: Any,
  record: PhaseRecord | None,
) -> run_lib.TrainResult:
  """Trains phase ``index`` of ``method`` to its end step (resuming in its folder)."""
  layout, schedule = runner.layout, runner.schedule
  return run_lib.train_model(
    model=model,
    partitioner=runner.partitioner,
    optimizer=runner.optimizer_for(method),
    vocabulary=runner.vocabulary,
    model_dir=layout.phase_dir(method, index),
    mixture_or_task_name=layout.mixture_for(method, index),
    task_feature_lengths=schedule.task_feature_lengths,
    train_steps=schedule.end_step(index),
    batch_size=schedule.batch_size,
    checkpoint_config=checkpoints.CheckpointConfig(),
    seed=schedule.seed,
    data_seed=schedule.seed + index,
    data_position="iterator",
    data_shards=layout.data_shards,
    pack=True,
    data_dir=runner.data_dir,
    summary_every_steps=runner.config.summary_every_steps,
    log_every_steps=runner.config.log_every_steps,
    eval_every_steps=0,
    regularizers=regularizers,
    optimizer_wrapper=wrapper,
    write_run_config=runner.write_run_config,
    extra_metadata={
      METADATA_KEY: dict(
        layout.lifelong_info(method, index), phase_record=record.to_dict() if record else None
      )
    },
  )


def evaluate(
  runner: LifelongRunner,
  method: str,
  index: int,
  model: lm.LanguageModel,
  params: PyTree,
  evaluator: Any,
  record: PhaseRecord | None,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
  """``(evals, routing, callback results)`` of the params after phase ``index``."""
  phase = runner.schedule.phases[index]
  evals = evaluator.evaluate(params)
  for task, values in evals.items():
    logging.info(
      "[%s] after %s | %s | loss %.4f | perplexity %.2f",
      method,
      phase.name,
      task,
      values["loss"],
      values["perplexity"],
    )
  routing = phase_analysis.phase_routing(evals, record)
  phase_analysis.log_routing(method, f"after {phase.name}", routing)
  ctx = PhaseContext(
    method,
    index,
    phase,
    model,
    params,
    runner.partitioner,
    runner.vocabulary,
    runner.layout.phase_dir(method, index),
  )
  callbacks = {name: phase_results.jsonable(fn(ctx)) for name, fn in runner.callbacks.items()}
  return evals, routing, callbacks
