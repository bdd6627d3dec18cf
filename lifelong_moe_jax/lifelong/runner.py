"""The lifelong runner: a phase schedule, trained end to end for every method, with a report.

Layout of ``MODEL_DIR``::

    MODEL_DIR/
      lifelong_run.json              schedule + model config of the run (a rerun must match it)
      report.json  report.md  forgetting.png  routing.png  expert_usage_<method>.png
      shared/phase_0_<name>/         first phase, trained once for the methods that share it
      <method>/phase_<i>_<name>/     one trainer MODEL_DIR per phase:
          checkpoints/<step>/        orbax checkpoints (global steps; metadata["lifelong"] holds the
                                     method, phase and PhaseRecord)
          train/metrics.jsonl        train metrics (loss, tokens/s, step time, expert usage, ...)
          ewc_fisher/                EWC: accumulated Fisher diagonal used by this phase
          step0_eval.json            evaluation of the step-0 checkpoint (phases i > 0)
          phase_result.json          evaluation after the phase (written last: phase complete)

Per method and phase ``i`` (steps are global: phase ``i`` trains from ``start_step(i)`` to
``end_step(i)``):

1. ``phase_result.json`` exists -> the phase is complete, skip it.
2. ``i > 0`` and the phase folder does not exist -> ``checkpoint_expansion.expand_checkpoint`` builds
   its step-0 checkpoint from the previous phase's final one (experts added for methods that
   expand; the method's ``prepare_phase_start``, e.g. the EWC Fisher), atomically (temporary folder
   + rename): surgery never runs twice. Every distribution is evaluated on that step-0 checkpoint
   once (``phase_analysis.step0_evaluation``, kept in ``step0_eval.json``).
3. Train with ``training.run.train_model`` on the runner's mesh, resuming from the latest
   checkpoint of the phase folder, with the method's regularizers and optimizer wrapper.
4. Evaluate every distribution of the schedule (validation loss, perplexity, expert usage, routing
   by owning phase), run the per-phase callbacks (few-shot), write ``phase_result.json`` and the
   report.

What a method does is decided by its ``methods.Method`` object; the runner only sequences phases.
Everything checkable (schedule, methods, task names, expert counts vs mesh, an existing run's
identity) is checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import gin
import jax

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import param_tree
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import registration
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.eval import phase_eval
from lifelong_moe_jax.lifelong import checkpoint_expansion
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong import phase_analysis
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import phase_start
from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong.phase_callbacks import FewshotEval, PhaseCallback, PhaseContext
from lifelong_moe_jax.lifelong.phase_callbacks import HarnessEval
from lifelong_moe_jax.lifelong.phase_layout import SHARED_DIR, RunLayout  # noqa: F401
from lifelong_moe_jax.lifelong.phase_record import METADATA_KEY
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule, ScheduleError
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import run as run_lib
from lifelong_moe_jax.training import summaries
from lifelong_moe_jax.training import train_state as ts

PyTree = Any


class LifelongError(ValueError):
  """A lifelong run cannot proceed (inconsistent folder, schedule or checkpoint)."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RunnerConfig:
  """Settings of a lifelong run besides its schedule and methods (gin: ``RunnerConfig.*``).

  Attributes:
    model_dir: the run folder.
    share_first_phase: train the first phase once for every method that trains it identically.
    summary_every_steps / log_every_steps: trainer summaries and progress lines.
    tfds_distributions: ``{name: {"tfds_name": ..., "tfds_data_dir": ..., "text_key": ...,
      "splits": {...}}}``: registers task ``lifelong_<name>`` over an existing TFDS dataset for each
      entry (``data.registration.register_tfds_distribution``) before the schedule is validated.
    mixtures: ``{name: [distribution or task, ...]}`` (equal rates) or ``{name: {distribution or
      task: rate, ...}}`` (weighted, e.g. ``{"web": 81, "wikipedia": 19}``), registered likewise.
    compilation_cache_dir: JAX persistent compilation cache: "auto" = ``MODEL_DIR/jax_cache``
      unless the process already has one configured; None leaves JAX's setting alone.
  """

  model_dir: str = ""
  share_first_phase: bool = True
  summary_every_steps: int = 10
  log_every_steps: int = 10
  tfds_distributions: Mapping[str, Mapping[str, Any]] | None = None
  mixtures: Mapping[str, Sequence[str] | Mapping[str, float]] | None = None
  compilation_cache_dir: str | None = "auto"


def register_distributions(
  tfds_distributions: Mapping[str, Mapping[str, Any]] | None,
  mixtures: Mapping[str, Sequence[str] | Mapping[str, float]] | None,
) -> None:
  """Registers TFDS-backed distributions and the mixtures named in gin (a list of members:
  equal rates; a ``{member: rate}`` dict: those rates)."""
  for name, spec in sorted((tfds_distributions or {}).items()):
    spec = dict(spec)
    if "tfds_name" not in spec:
      raise ScheduleError(f"tfds_distributions[{name!r}] needs a 'tfds_name' (e.g. 'c4/en:3.1.0').")
    registration.register_tfds_distribution(name, spec.pop("tfds_name"), **spec)
  for name, members in sorted((mixtures or {}).items()):
    try:
      registration.register_mixture(
        name, dict(members) if isinstance(members, Mapping) else list(members)
      )
    except ValueError as e:
      raise ScheduleError(f"RunnerConfig.mixtures[{name!r}]: {e}") from e


def _field_defaults(cls: type) -> dict[str, Any]:
  """``{field: class default}`` of a dataclass (gin bindings ignored)."""
  return {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
  }


def _primary() -> bool:
  return jax.process_index() == 0


class LifelongRunner:
  """Runs a ``LifelongSchedule`` for several methods (see the module docstring).

  Args:
    config: run settings (default ``RunnerConfig()`` from gin); ``model_dir`` overrides its folder.
    schedule: default ``LifelongSchedule()`` from gin.
    methods: overrides ``schedule.methods`` (e.g. from ``--methods``).
    options: method hyperparameters (default ``MethodOptions()`` from gin).
    model_config: the base model (default ``ModelConfig()`` from gin; phase 0's expert count).
    mesh_config: the mesh every phase trains, expands and evaluates on (default ``MeshConfig()``).
    data_dir: prepared data dir (default: the usual resolution).
    fewshot: optional few-shot evaluation after every phase (default ``FewshotEval()``, off).
    callbacks: more per-phase callbacks ``{name: fn(PhaseContext) -> dict}``.
    model_dir: the run folder (default ``config.model_dir``).
    write_run_config: ``fn(phase_dir)`` called before a phase's first write (the CLI writes the
      operative gin config there).
  """

  def __init__(
    self,
    config: RunnerConfig | None = None,
    *,
    schedule: LifelongSchedule | None = None,
    methods: Sequence[str] | None = None,
    options: methods_lib.MethodOptions | None = None,
    model_config: ModelConfig | None = None,
    mesh_config: partitioning.MeshConfig | None = None,
    data_dir: str | None = None,
    fewshot: FewshotEval | None = None,
    callbacks: Mapping[str, PhaseCallback] | None = None,
    model_dir: str | None = None,
    write_run_config: Callable[[str], Any] | None = None,
  ):
    self.write_run_config = write_run_config
    self.config = config or RunnerConfig()
    model_dir = model_dir or self.config.model_dir
    if not model_dir:
      raise LifelongError("model_dir is required (--gin.MODEL_DIR=\\\"/path\\\").")
    self.model_dir = checkpoints.absolute(model_dir)
    self.schedule = schedule or LifelongSchedule()
    self.methods = tuple(methods or self.schedule.methods)
    if not self.methods or len(set(self.methods)) != len(self.methods):
      raise ScheduleError(f"Methods must be non-empty and unique, got {list(self.methods)}.")
    self.method_objects = {m: methods_lib.get_method(m) for m in self.methods}
    self.options = options or methods_lib.MethodOptions()
    self.data_dir = data_dir
    self.callbacks: dict[str, PhaseCallback] = dict(callbacks or {})
    fewshot = fewshot or FewshotEval()
    if fewshot.enabled:
      self.callbacks.setdefault("fewshot", fewshot.callback())
    HarnessEval().add_to(self.callbacks)  # gin: HarnessEval.enabled / tasks / include_path
    register_distributions(self.config.tfds_distributions, self.config.mixtures)
    self.vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
    self.fingerprint = vocab_lib.vocabulary_fingerprint(self.vocabulary)
    self.base_config = lm.build_model(
      model_config or ModelConfig(), self.vocabulary.vocab_size
    ).config
    self.mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
    self.partitioner = partitioning.Partitioner(self.mesh)
    self.optimizer = optimizers.create_optimizer(
      train_steps=self.schedule.total_steps,
      schedule=optimizers.phase_warmup_schedule(
        [self.schedule.start_step(i) for i in range(1, len(self.schedule.phases))],
        self.options.phase_warmup_steps,
        train_steps=self.schedule.total_steps,
      ),
    )
    self.layout = RunLayout(
      self.model_dir, self.schedule, self.options, self.base_config, self.config.share_first_phase
    )
    self.phase_dir, self.final_step_dir = self.layout.phase_dir, self.layout.final_step_dir
    self.config_for = self.layout.config_for
    self._eval_batch_cache: dict = {}
    self._validate()

  # ----------------------------------------------------------------------------- validation
  def _validate(self) -> None:
    """Everything checkable before training: tasks, methods, expert counts, mesh, batch, folder."""
    sched = self.schedule
    for p in sched.phases:
      pipeline.validate_task_name(p.mixture)
    self.eval_tasks = loss_eval.eval_task_names(
      None, [p.mixture for p in sched.phases] + list(sched.extra_eval_tasks)
    )
    length = sched.task_feature_lengths.get("targets")
    if set(sched.task_feature_lengths) != {"targets"} or length > self.base_config.max_length:
      raise ScheduleError(
        f"task_feature_lengths must be {{'targets': L}} with L <= "
        f"ModelConfig.max_length={self.base_config.max_length}, got "
        f"{sched.task_feature_lengths}."
      )
    for method in self.method_objects.values():
      method.validate(sched, self.base_config)
      partitioning.validate_model_for_mesh(
        self.config_for(method.name, len(sched.phases) - 1), self.mesh
      )
    if any(m.expand or m.final_experts for m in self.method_objects.values()):
      sched.validate_experts(self.base_config.num_experts, self.mesh.shape["expert"])
    partitioning.validate_batch_for_mesh(sched.batch_size, self.mesh)
    partitioning.validate_batch_for_mesh(sched.eval_batch, self.mesh)
    try:
      phase_results.check_run_identity(
        self.model_dir,
        self.run_identity(),
        defaults={
          "options": _field_defaults(methods_lib.MethodOptions),
          "model_config": _field_defaults(ModelConfig),
        },
      )
    except ValueError as e:
      raise LifelongError(str(e)) from e

  def run_identity(self) -> dict[str, Any]:
    """What must not change between invocations on one MODEL_DIR."""
    ident = self.schedule.to_dict()
    ident.pop("methods")
    return {
      "schedule": ident,
      "model_config": dataclasses.asdict(self.base_config),
      "vocabulary_fingerprint": self.fingerprint,
      "options": self.options.to_dict(),
      "share_first_phase": self.config.share_first_phase,
    }

  # ----------------------------------------------------------------------------- one phase
  def run_phase(self, method: str, index: int) -> dict[str, Any]:
    """Trains and evaluates one phase (resuming or skipping as the folder says); returns its result."""
    phase = self.schedule.phases[index]
    pdir = self.phase_dir(method, index)
    result_path = os.path.join(pdir, phase_results.RESULT_FILE)
    if os.path.exists(result_path):
      logging.info("[%s] phase %d (%s) already complete: %s", method, index, phase.name, pdir)
      return phase_results.read_json(result_path)
    method_obj = methods_lib.get_method(method)
    config = self.config_for(method, index)
    logging.info(
      "[%s] ===== phase %d/%d %s: %s, steps %d..%d, %s =====",
      method,
      index + 1,
      len(self.schedule.phases),
      phase.name,
      self.layout.mixture_for(method, index),
      self.schedule.start_step(index),
      self.schedule.end_step(index),
      f"{config.num_experts} experts per MoE layer" if config.is_moe else "dense",
    )
    t_start = time.perf_counter()
    layout = self.layout
    previous_params = (
      phase_start.build_phase_start(
        layout, self.partitioner, self.optimizer, self.data_dir, method, index
      )
      if index > 0
      else None
    )
    record = phase_start.record_at_start(layout, method, index)
    model = lm.LanguageModel(config)
    evaluator = self._evaluator(model)
    start = None
    if index > 0:  # every distribution on the step-0 checkpoint (after surgery, before updates)
      start = phase_analysis.step0_evaluation(
        layout, self.partitioner, self.optimizer, self.data_dir, method, index, evaluator, record
      )
      phase_analysis.log_step0(
        method, phase.name, self._previous_eval(method, index), start["eval"]
      )
      phase_analysis.log_routing(method, f"at step 0 of {phase.name}", start.get("routing"))
    regularizers, wrapper = [], None
    if index > 0:
      setup = phase_start.phase_setup(
        layout, self.partitioner, self.data_dir, method, index, record, previous_params
      )
      regularizers, wrapper = method_obj.regularizers(setup), method_obj.optimizer_wrapper(setup)
    del previous_params
    t_train = time.perf_counter()
    result = run_lib.train_model(
      model=model,
      partitioner=self.partitioner,
      optimizer=self.optimizer,
      vocabulary=self.vocabulary,
      model_dir=pdir,
      mixture_or_task_name=self.layout.mixture_for(method, index),
      task_feature_lengths=self.schedule.task_feature_lengths,
      train_steps=self.schedule.end_step(index),
      batch_size=self.schedule.batch_size,
      checkpoint_config=checkpoints.CheckpointConfig(),
      seed=self.schedule.seed,
      data_seed=self.schedule.seed + index,
      data_position="iterator",
      pack=True,
      data_dir=self.data_dir,
      summary_every_steps=self.config.summary_every_steps,
      log_every_steps=self.config.log_every_steps,
      eval_every_steps=0,
      regularizers=regularizers,
      optimizer_wrapper=wrapper,
      write_run_config=self.write_run_config,
      extra_metadata={
        METADATA_KEY: dict(
          layout.lifelong_info(method, index), phase_record=record.to_dict() if record else None
        )
      },
    )
    train_wall = time.perf_counter() - t_train
    logging.info(
      "[%s] phase %d (%s) trained in %s; evaluating %d distributions.",
      method,
      index,
      phase.name,
      summaries.format_duration(train_wall),
      len(self.eval_tasks),
    )
    params = result.state.params
    if record is not None:
      record.validate_expert_counts(param_tree.expert_counts(params, result.trainer.params_axes))
    t_eval = time.perf_counter()
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
    ctx = PhaseContext(method, index, phase, model, params, self.partitioner, self.vocabulary, pdir)
    callback_results = {
      name: phase_results.jsonable(fn(ctx)) for name, fn in self.callbacks.items()
    }
    eval_wall = time.perf_counter() - t_eval
    train, timing = phase_results.train_summary(
      os.path.join(pdir, "train", "metrics.jsonl"),
      self.schedule.start_step(index),
      self.schedule.end_step(index),
    )
    timing.update(result.teardown)
    timing.update(
      train_wall_s=train_wall,
      eval_wall_s=eval_wall,
      phase_wall_s=time.perf_counter() - t_start,
      trained_steps_this_invocation=int(result.state.step) - result.start_step,
    )
    out = {
      "format_version": phase_results.RESULT_FORMAT_VERSION,
      "method": method,
      "trained_by": "shared" if self.layout.is_shared(method, index) else method,
      "phase_index": index,
      "phase": phase.name,
      "mixture": phase.mixture,
      "trained_on": self.layout.mixture_for(method, index),
      "steps": phase.steps,
      "start_step": self.schedule.start_step(index),
      "end_step": self.schedule.end_step(index),
      "num_experts": config.num_experts,
      "experts_per_layer": [config.num_experts] * config.num_moe_layers,
      "expert_slices": (
        {k: list(v) for k, v in record.expert_slices().items()} if record is not None else {}
      ),
      "num_params": ts.param_count(params),
      "eval": evals,
      "train": train,
      "callbacks": callback_results,
      "timing": timing,
    }
    if routing:
      out["routing"] = routing
    if start is not None:
      out.update(phase_analysis.start_entries(start))
    if _primary():
      phase_results.write_json_atomic(result_path, out)
    checkpoint_expansion.sync_processes(f"phase-done-{method}-{index}")
    return out

  def _evaluator(self, model: lm.LanguageModel) -> phase_eval.PhaseEvaluator:
    """A ``PhaseEvaluator`` of ``model`` over every distribution (batches cached per run)."""
    return phase_eval.PhaseEvaluator(
      model,
      self.partitioner,
      self.eval_tasks,
      self.schedule.task_feature_lengths,
      self.schedule.eval_batch,
      max_batches=self.schedule.eval_max_batches,
      data_dir=self.data_dir,
      batch_cache=self._eval_batch_cache,
    )

  def _previous_eval(self, method: str, index: int) -> dict[str, Any] | None:
    """The evaluation after phase ``index - 1`` (None when its result is missing)."""
    path = os.path.join(self.phase_dir(method, index - 1), phase_results.RESULT_FILE)
    return phase_results.read_json(path).get("eval") if os.path.exists(path) else None

  def backfill_analysis(self) -> list[str]:
    """Adds the ``routing`` and ``eval_at_start`` entries that phases completed before these
    measurements existed lack, from their checkpoints (``phase_analysis.backfill``), for every
    method with results in MODEL_DIR; returns the rewritten ``phase_result.json`` paths."""
    self._enable_compilation_cache()
    methods = list(self.layout.collect_results(self.methods))
    return phase_analysis.backfill(
      self.layout, self.partitioner, self.optimizer, self.data_dir, methods, self._evaluator
    )

  # ----------------------------------------------------------------------------- whole run
  def run(self) -> dict[str, Any]:
    """Runs every method's phases (skipping complete ones), writing the report after each phase.

    Returns:
      The report (``report.json`` content).
    """
    self._enable_compilation_cache()
    if _primary():
      os.makedirs(self.model_dir, exist_ok=True)
      path = os.path.join(self.model_dir, phase_results.RUN_FILE)
      if not os.path.exists(path):
        phase_results.write_json_atomic(path, self.run_identity())
    checkpoint_expansion.sync_processes("run-file")
    t0 = time.perf_counter()
    total, done = len(self.methods) * len(self.schedule.phases), 0
    for method in self.methods:
      for index in range(len(self.schedule.phases)):
        self.run_phase(method, index)
        done += 1
        self.write_report()
        elapsed = time.perf_counter() - t0
        logging.info(
          "Lifelong run: %d/%d phases done, %s elapsed, ETA %s.",
          done,
          total,
          summaries.format_duration(elapsed),
          summaries.format_duration(elapsed / done * (total - done)),
        )
    return self.write_report()

  def _enable_compilation_cache(self) -> None:
    """Points JAX's persistent compilation cache at ``config.compilation_cache_dir``."""
    path = self.config.compilation_cache_dir
    if path is None or jax.config.jax_compilation_cache_dir:
      return
    if path == "auto":
      path = os.path.join(self.model_dir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    logging.info("JAX persistent compilation cache: %s", path)

  def write_report(self) -> dict[str, Any]:
    """Rebuilds ``report.json``, ``report.md`` and the PNGs from the phase results on disk."""
    results = self.layout.collect_results(self.methods)
    report = report_lib.build_report(
      schedule=self.schedule.to_dict(),
      model_config=dataclasses.asdict(self.base_config),
      options=self.options.to_dict(),
      eval_tasks=self.eval_tasks,
      phase_tasks=[loss_eval.eval_task_names(p.mixture) for p in self.schedule.phases],
      results=results,
      method_specs=methods_lib.describe(list(results)),
    )
    if _primary():
      report_lib.write_report(self.model_dir, report)
    checkpoint_expansion.sync_processes("report")
    return report

  def check_methods_ran(self) -> None:
    """Refuses (before any write) a report of methods that have no finished phase yet.

    Raises:
      LifelongError: naming the methods without a phase result and those that have one.
    """
    done = self.layout.collect_results(self.methods)
    missing = [m for m in self.methods if m not in done]
    if missing:
      have = ", ".join(sorted(done)) or "none"
      raise LifelongError(
        f"--report_only: method(s) {', '.join(missing)} have no finished phase in "
        f"{self.model_dir} (methods with results: {have}); run them first (without "
        "--report_only) or pass --methods with methods that ran."
      )


def run_lifelong(
  model_dir: str, methods: Sequence[str] | None = None, data_dir: str | None = None, **kwargs
) -> dict[str, Any]:
  """Builds a ``LifelongRunner`` (gin supplies the rest) and runs it; returns the report."""
  return LifelongRunner(model_dir=model_dir, methods=methods, data_dir=data_dir, **kwargs).run()
