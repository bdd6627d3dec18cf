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

Per method and phase ``i`` (``phase_run.run_phase``; steps are global: phase ``i`` trains from
``start_step(i)`` to ``end_step(i)``):

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
Everything checkable (schedule, methods, task names, expert counts vs mesh, input shards, an
existing run's identity) is checked before anything is written. Every global batch the run reads
is assembled from ``RunnerConfig.data_shards`` input shards, so its numbers do not depend on the
number of processes; only process 0 writes JSON, reports and plots (checkpoints are written
cooperatively).
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
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import registration
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.eval import phase_eval
from lifelong_moe_jax.lifelong import checkpoint_expansion
from lifelong_moe_jax.lifelong import method_options
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong import phase_analysis
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import phase_run
from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong.phase_callbacks import FewshotEval, PhaseCallback
from lifelong_moe_jax.lifelong.phase_callbacks import HarnessEval
from lifelong_moe_jax.lifelong.phase_layout import SHARED_DIR, RunLayout  # noqa: F401
from lifelong_moe_jax.lifelong.phase_run import LifelongError
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule, ScheduleError
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import summaries

PyTree = Any


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
    method_variants: ``{name: {"base": method, <MethodOptions field>: value, ...}}``: methods
      registered for this run that use other ``MethodOptions`` values than the run's, e.g.
      ``{"lifelong_moe_dw0.3": {"base": "lifelong_moe", "distill_weight": 0.3}}``; they share the
      first phase with every other method that trains it identically
      (``methods.method_variant``).
    data_shards: input shards every global batch is assembled from (training streams, replay
      and joint mixtures, evaluation, usage and EWC Fisher batches; None: the process count). A
      run reads the same global batches in any number of processes that divides it, e.g.
      ``data_shards = 2`` in 1 process x 8 devices and in 2 processes x 4 devices.
  """

  model_dir: str = ""
  share_first_phase: bool = True
  summary_every_steps: int = 10
  log_every_steps: int = 10
  tfds_distributions: Mapping[str, Mapping[str, Any]] | None = None
  mixtures: Mapping[str, Sequence[str] | Mapping[str, float]] | None = None
  compilation_cache_dir: str | None = "auto"
  method_variants: Mapping[str, Mapping[str, Any]] | None = None
  data_shards: int | None = None


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


def register_method_variants(variants: Mapping[str, Mapping[str, Any]] | None) -> None:
  """Registers ``RunnerConfig.method_variants`` (``methods.method_variant``)."""
  for name, spec in sorted((variants or {}).items()):
    if not isinstance(spec, Mapping):
      raise ScheduleError(
        f"RunnerConfig.method_variants[{name!r}] must be a dict like "
        "{'base': 'lifelong_moe', 'distill_weight': 0.3}, got " + repr(spec)
      )
    try:
      methods_lib.method_variant(name, spec)
    except (TypeError, ValueError) as e:
      raise ScheduleError(f"RunnerConfig.method_variants[{name!r}]: {e}") from e


def enable_compilation_cache(setting: str | None, model_dir: str) -> None:
  """Points JAX's persistent compilation cache at ``setting`` (``RunnerConfig.
  compilation_cache_dir``: "auto" = ``model_dir/jax_cache``) unless one is configured."""
  if setting is None or jax.config.jax_compilation_cache_dir:
    return
  path = os.path.join(model_dir, "jax_cache") if setting == "auto" else setting
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("JAX persistent compilation cache: %s", path)


def _field_defaults(cls: type) -> dict[str, Any]:
  """``{field: class default}`` of a dataclass (gin bindings ignored)."""
  return {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
  }


def check_run_identity(model_dir: str, identity: Mapping[str, Any]) -> None:
  """Refuses a MODEL_DIR holding another run (``phase_results.check_run_identity``; options and
  model fields at their class defaults count as absent, so newer fields do not refuse old runs).

  Raises:
    LifelongError: naming the differing entries.
  """
  try:
    phase_results.check_run_identity(
      model_dir,
      identity,
      defaults={
        "options": {
          **_field_defaults(methods_lib.MethodOptions),
          **method_options.LEGACY_OPTION_VALUES,
        },
        "model_config": _field_defaults(ModelConfig),
      },
    )
  except ValueError as e:
    raise LifelongError(str(e)) from e


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
    register_method_variants(self.config.method_variants)
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
    self.layout = RunLayout(
      self.model_dir,
      self.schedule,
      self.options,
      self.base_config,
      self.config.share_first_phase,
      data_shards=self.schedule.resolve_data_shards(self.config.data_shards, jax.process_count()),
    )
    self._optimizers: dict[int, optimizers.Optimizer] = {}
    self.optimizer = self.optimizer_for(self.methods[0])
    self.phase_dir, self.final_step_dir = self.layout.phase_dir, self.layout.final_step_dir
    self.config_for = self.layout.config_for
    self._eval_batch_cache: dict = {}
    self._validate()

  def optimizer_for(self, method: str) -> optimizers.Optimizer:
    """The optimizer ``method`` trains with (its ``phase_warmup_steps`` re-warm each phase)."""
    warmup = self.layout.options_for(method).phase_warmup_steps
    if warmup not in self._optimizers:
      self._optimizers[warmup] = optimizers.create_optimizer(
        train_steps=self.schedule.total_steps,
        schedule=optimizers.phase_warmup_schedule(
          [self.schedule.start_step(i) for i in range(1, len(self.schedule.phases))],
          warmup,
          train_steps=self.schedule.total_steps,
        ),
      )
    return self._optimizers[warmup]

  # ----------------------------------------------------------------------------- validation
  def _validate(self) -> None:
    """Everything checkable before training: tasks, methods, expert counts, mesh, batch, folder."""
    sched = self.schedule
    for p in sched.phases:
      pipeline.validate_task_name(p.mixture)
    self.eval_tasks = loss_eval.eval_task_names(
      None, [p.mixture for p in sched.phases] + list(sched.extra_eval_tasks)
    )
    sched.validate_lengths(self.base_config.max_length)
    for method in self.method_objects.values():
      method.validate(sched, self.base_config, method.options(self.options))
      partitioning.validate_model_for_mesh(
        self.config_for(method.name, len(sched.phases) - 1), self.mesh
      )
    if any(m.expand or m.final_experts for m in self.method_objects.values()):
      sched.validate_experts(self.base_config.num_experts, self.mesh.shape["expert"])
    partitioning.validate_batch_for_mesh(sched.batch_size, self.mesh)
    partitioning.validate_batch_for_mesh(sched.eval_batch, self.mesh)
    check_run_identity(self.model_dir, self.run_identity())

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
    """Trains and evaluates one phase (resuming or skipping as the folder says); returns its result
    (``phase_run.run_phase``)."""
    return phase_run.run_phase(self, method, index)

  def evaluator(self, model: lm.LanguageModel) -> phase_eval.PhaseEvaluator:
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
      data_shards=self.layout.data_shards,
    )

  def backfill_analysis(self) -> list[str]:
    """Adds the ``routing`` and ``eval_at_start`` entries that phases completed before these
    measurements existed lack, from their checkpoints (``phase_analysis.backfill``), for every
    method with results in MODEL_DIR; returns the rewritten ``phase_result.json`` paths."""
    enable_compilation_cache(self.config.compilation_cache_dir, self.model_dir)
    methods = list(self.layout.collect_results(self.methods))
    return phase_analysis.backfill(
      self.layout, self.partitioner, self.optimizer, self.data_dir, methods, self.evaluator
    )

  # ----------------------------------------------------------------------------- whole run
  def run(self) -> dict[str, Any]:
    """Runs every method's phases (skipping complete ones), writing the report after each phase
    it trains and once at the end.

    Returns:
      The report (``report.json`` content).
    """
    enable_compilation_cache(self.config.compilation_cache_dir, self.model_dir)
    if _primary():
      os.makedirs(self.model_dir, exist_ok=True)
      path = os.path.join(self.model_dir, phase_results.RUN_FILE)
      if not os.path.exists(path):
        phase_results.write_json_atomic(path, self.run_identity())
    checkpoint_expansion.sync_processes("run-file")
    t0 = time.perf_counter()
    plan = [(m, i) for m in self.methods for i in range(len(self.schedule.phases))]
    todo = {self.phase_dir(*p) for p in plan if not self._phase_complete(*p)}  # shared: once
    logging.info(
      "Lifelong run: %d methods x %d phases, %d phase(s) to train (a shared phase once).",
      len(self.methods),
      len(self.schedule.phases),
      len(todo),
    )
    done = 0
    for method, index in plan:
      complete = self._phase_complete(method, index)
      self.run_phase(method, index)
      if complete:
        continue
      done += 1
      self.write_report()
      elapsed = time.perf_counter() - t0
      logging.info(
        "Lifelong run: %d/%d phases trained, %s elapsed, ETA %s.",
        done,
        len(todo),
        summaries.format_duration(elapsed),
        summaries.format_duration(elapsed / done * (len(todo) - done)),
      )
    return self.write_report()

  def _phase_complete(self, method: str, index: int) -> bool:
    return os.path.exists(self.layout.result_path(method, index))

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
