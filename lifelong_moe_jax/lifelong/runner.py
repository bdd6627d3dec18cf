"""The lifelong runner: a phase schedule, trained end to end for every method, with a report.

Layout of ``MODEL_DIR``::

    MODEL_DIR/
      lifelong_run.json              schedule + model config of the run (a rerun must match it)
      report.json  report.md  forgetting.png  expert_usage_<method>.png
      shared/phase_0_<name>/         first phase, trained once for the methods that share it
      <method>/phase_<i>_<name>/     one trainer MODEL_DIR per phase:
          checkpoints/<step>/        orbax checkpoints (global steps; metadata["lifelong"] holds the
                                     method, phase and PhaseRecord)
          train/metrics.jsonl        train metrics (loss, tokens/s, step time, expert usage, ...)
          ewc_fisher/                EWC: accumulated Fisher diagonal used by this phase
          phase_result.json          evaluation after the phase (written last: phase complete)

Per method and phase ``i`` (steps are global: phase ``i`` trains from ``start_step(i)`` to
``end_step(i)``):

1. ``phase_result.json`` exists -> the phase is complete, skip it.
2. ``i > 0`` and the phase folder does not exist -> build its step-0 checkpoint: restore the
   previous phase's final state, expand it (methods that expand: params, optimizer state, phase
   record; validated), estimate the EWC Fisher (ewc), and save everything in ``<phase>.tmp``, then
   rename it to the phase folder. A crash before the rename leaves only the temporary folder, which
   the restart deletes and rebuilds from the (unchanged) previous phase; after the rename the phase
   folder exists and surgery is never run again. The step-0 metadata's phase record is checked
   against the params (``surgery.expansion_needed``) before training.
3. Train with ``train.train`` in the phase folder: it resumes from the latest checkpoint there (the
   step-0 checkpoint, or a mid-phase one after a crash: exact resume, data position included),
   with the method's regularizers (distillation / L2 / EWC) and freezing optimizer wrapper.
4. Evaluate every distribution of the schedule (validation loss, perplexity, expert usage), run the
   optional per-phase callbacks (few-shot), write ``phase_result.json`` and the report.

Everything that can be checked (schedule, methods, task names, expert counts vs mesh, an existing
run's schedule) is checked before any training starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax import train as train_lib
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.eval import fewshot as fewshot_lib
from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.lifelong import baselines
from lifelong_moe_jax.lifelong import distill
from lifelong_moe_jax.lifelong import freeze
from lifelong_moe_jax.lifelong import penalties
from lifelong_moe_jax.lifelong import phase_eval
from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong import surgery
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule, PhaseSpec, ScheduleError
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import evaluation
from lifelong_moe_jax.training import metrics as metrics_lib
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import train_state as ts
from lifelong_moe_jax.training import trainer as trainer_lib

PyTree = Any
RESULT_FILE = "phase_result.json"
RUN_FILE = "lifelong_run.json"
SHARED_DIR = "shared"
METADATA_KEY = "lifelong"
RESULT_FORMAT_VERSION = 1
FISHER_DIR = "ewc_fisher"


class LifelongError(ValueError):
  """A lifelong run cannot proceed (inconsistent folder, schedule or checkpoint)."""


@dataclasses.dataclass(frozen=True)
class PhaseContext:
  """What a per-phase callback gets after a phase has been trained.

  Attributes:
    method: method name.
    index: phase index.
    phase: the phase spec.
    model: the phase's model.
    params: its final params (sharded).
    partitioner: mesh + rules.
    vocabulary: the seqio vocabulary.
    phase_dir: the phase folder.
  """
  method: str
  index: int
  phase: PhaseSpec
  model: lm.LanguageModel
  params: PyTree
  partitioner: partitioning.Partitioner
  vocabulary: Any
  phase_dir: str


PhaseCallback = Callable[[PhaseContext], Mapping[str, Any]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FewshotEval:
  """Optional few-shot evaluation after every phase (off by default).

  Uses ``lifelong_moe_jax.eval.fewshot.run_fewshot``; results go to the phase result and the report
  under ``callbacks.fewshot``: ``{task: {metric: value, "chance", "num_examples", "primary_metric",
  "num_shots"}}``.

  Attributes:
    enabled: run it.
    task_names: few-shot tasks (None: every embedded task whose data is present).
    k: demonstrations per prompt (None: the few-shot module's gin default).
    max_examples: questions per task (None: the few-shot module's default).
  """
  enabled: bool = False
  task_names: Sequence[str] | None = None
  k: int | None = None
  max_examples: int | None = None

  def callback(self) -> PhaseCallback:
    """The phase callback; unknown task names are refused here, before any training."""
    task_names = list(self.task_names) if self.task_names else None
    for name in task_names or ():
      try:
        prompts.get_task(name)
      except prompts.FewShotError as e:
        raise LifelongError(f"FewshotEval.task_names: {e}") from e
    extra = {} if self.max_examples is None else {"max_examples": self.max_examples}

    def run(ctx: PhaseContext) -> Mapping[str, Any]:
      results = fewshot_lib.run_fewshot(ctx.model, ctx.params, ctx.vocabulary, task_names, self.k,
                                        **extra)
      num_shots = self.k if self.k is not None else prompts.fewshot_defaults()["num_shots"]
      return {name: dict(values, primary_metric=prompts.get_task(name).primary_metric,
                         num_shots=num_shots) for name, values in results.items()}
    return run


# ------------------------------------------------------------------------------- small helpers
def _primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def write_json_atomic(path: str, value: Any) -> None:
  """Writes JSON to ``path`` via a temporary file and a rename (never a torn file)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_jsonable(value), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _float32_like(params: PyTree) -> PyTree:
  """float32 ``ShapeDtypeStruct``s with the shapes and shardings of ``params``."""
  return jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), params)


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def train_summary(metrics_path: str, start_step: int, end_step: int) -> tuple[dict, dict]:
  """``(train, timing)`` of a phase from its ``train/metrics.jsonl`` records in (start, end].

  ``train``: the last summary's ``loss`` and ``cross_entropy`` (reproducible); ``timing``: mean
  ``step_time`` and ``tokens_per_second`` over the phase's summaries (host wall clock).
  """
  records = [r for r in metrics_lib.read_jsonl(metrics_path)
             if start_step < int(r.get("step", 0)) <= end_step]
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


def register_distributions(tfds_distributions: Mapping[str, Mapping[str, Any]] | None,
                           mixtures: Mapping[str, Sequence[str]] | None) -> None:
  """Registers TFDS-backed distributions and equal-rate mixtures named in gin (see the runner)."""
  if not tfds_distributions and not mixtures:
    return
  import tasks  # pylint: disable=import-outside-toplevel
  for name, spec in sorted((tfds_distributions or {}).items()):
    spec = dict(spec)
    if "tfds_name" not in spec:
      raise ScheduleError(f"tfds_distributions[{name!r}] needs a 'tfds_name' (e.g. 'c4/en:3.1.0').")
    tasks.register_tfds_distribution(name, spec.pop("tfds_name"), **spec)
  for name, members in sorted((mixtures or {}).items()):
    tasks.register_mixture(name, list(members))


# ------------------------------------------------------------------------------- the runner
@gin.configurable(denylist=["callbacks"])
class LifelongRunner:
  """Runs a ``LifelongSchedule`` for several methods (see the module docstring).

  Args:
    model_dir: the run folder.
    schedule: default ``LifelongSchedule()`` from gin.
    methods: overrides ``schedule.methods`` (e.g. from ``--methods``).
    options: method hyperparameters (default ``MethodOptions()`` from gin).
    model_config: the base model (default ``ModelConfig()`` from gin; phase 0's expert count).
    mesh_config: default ``MeshConfig()`` from gin.
    data_dir: prepared data dir (default: the usual resolution).
    share_first_phase: train the first phase once for every method that trains it identically.
    summary_every_steps / log_every_steps: trainer summaries and progress lines.
    fewshot: optional few-shot evaluation after every phase (default ``FewshotEval()``, off).
    tfds_distributions: ``{name: {"tfds_name": ..., "tfds_data_dir": ..., "text_key": ...,
      "splits": {...}}}``: registers task ``lifelong_<name>`` over an existing TFDS dataset for each
      entry (``tasks.register_tfds_distribution``), before the schedule is validated (pod runs).
    mixtures: ``{name: [distribution or task, ...]}``: equal-rate mixtures registered likewise.
    compilation_cache_dir: JAX persistent compilation cache (phases with the same shapes, reruns
      and resumed runs skip XLA compilation): "auto" = ``MODEL_DIR/jax_cache`` unless the process
      already has one configured; None leaves JAX's setting alone. Sets the process-wide
      ``jax_compilation_cache_dir``.
    callbacks: more per-phase callbacks ``{name: fn(PhaseContext) -> dict}`` (Python only).
  """

  def __init__(self, model_dir: str = gin.REQUIRED, schedule: LifelongSchedule | None = None,
               methods: Sequence[str] | None = None,
               options: baselines.MethodOptions | None = None,
               model_config: ModelConfig | None = None,
               mesh_config: partitioning.MeshConfig | None = None, data_dir: str | None = None,
               share_first_phase: bool = True, summary_every_steps: int = 10,
               log_every_steps: int = 10, fewshot: FewshotEval | None = None,
               tfds_distributions: Mapping[str, Mapping[str, Any]] | None = None,
               mixtures: Mapping[str, Sequence[str]] | None = None,
               compilation_cache_dir: str | None = "auto",
               callbacks: Mapping[str, PhaseCallback] | None = None):
    if not model_dir:
      raise LifelongError("model_dir is required (--gin.MODEL_DIR=\\\"/path\\\").")
    self.model_dir = checkpoints.absolute(model_dir)
    self.schedule = schedule or LifelongSchedule()
    self.methods = tuple(methods or self.schedule.methods)
    if not self.methods or len(set(self.methods)) != len(self.methods):
      raise ScheduleError(f"Methods must be non-empty and unique, got {list(self.methods)}.")
    self.method_specs = {m: baselines.get_method(m) for m in self.methods}
    self.options = options or baselines.MethodOptions()
    self.data_dir = data_dir
    self.share_first_phase = share_first_phase
    self.summary_every_steps = summary_every_steps
    self.log_every_steps = log_every_steps
    self.callbacks: dict[str, PhaseCallback] = dict(callbacks or {})
    self.compilation_cache_dir = compilation_cache_dir
    self._eval_batch_cache: dict = {}
    fewshot = fewshot or FewshotEval()
    if fewshot.enabled:
      self.callbacks.setdefault("fewshot", fewshot.callback())
    register_distributions(tfds_distributions, mixtures)
    self.vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
    self.fingerprint = vocab_lib.vocabulary_fingerprint(self.vocabulary)
    self.base_config = lm.build_model(model_config or ModelConfig(),
                                      self.vocabulary.vocab_size).config
    self.mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
    self.partitioner = partitioning.Partitioner(self.mesh)
    self.optimizer = optimizers.create_optimizer(train_steps=self.schedule.total_steps)
    self._validate()

  # ----------------------------------------------------------------------------- validation
  def _validate(self) -> None:
    """Everything checkable before training: tasks, expert counts, mesh, batch, folder."""
    sched = self.schedule
    for p in sched.phases:
      pipeline.validate_task_name(p.mixture)
    self.eval_tasks = evaluation.eval_task_names(None, [p.mixture for p in sched.phases]
                                                 + list(sched.extra_eval_tasks))
    length = sched.task_feature_lengths.get("targets")
    if set(sched.task_feature_lengths) != {"targets"} or length > self.base_config.max_length:
      raise ScheduleError(f"task_feature_lengths must be {{'targets': L}} with L <= "
                          f"ModelConfig.max_length={self.base_config.max_length}, got "
                          f"{sched.task_feature_lengths}.")
    expanding = any(s.expand for s in self.method_specs.values())
    if expanding and not self.base_config.is_moe:
      raise ScheduleError(f"Methods {[m for m, s in self.method_specs.items() if s.expand]} add "
                          "experts but the model is dense (ModelConfig.num_experts = 0).")
    for name in self.methods:
      config = self.config_for(name, len(sched.phases) - 1)
      partitioning.validate_model_for_mesh(config, self.mesh)
    if expanding:
      sched.validate_experts(self.base_config.num_experts, self.mesh.shape["expert"])
    partitioning.validate_batch_for_mesh(sched.batch_size, self.mesh)
    partitioning.validate_batch_for_mesh(sched.eval_batch, self.mesh)
    self._check_run_file()

  def run_identity(self) -> dict[str, Any]:
    """What must not change between invocations on one MODEL_DIR."""
    ident = self.schedule.to_dict()
    ident.pop("methods")
    return {"schedule": ident, "model_config": dataclasses.asdict(self.base_config),
            "vocabulary_fingerprint": self.fingerprint, "options": self.options.to_dict(),
            "share_first_phase": self.share_first_phase}

  def _check_run_file(self) -> None:
    path = os.path.join(self.model_dir, RUN_FILE)
    current = _jsonable(self.run_identity())
    if os.path.exists(path):
      saved = read_json(path)
      diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      if diffs:
        raise LifelongError(
            f"{self.model_dir} holds a lifelong run with a different {', '.join(diffs)} (see "
            f"{path}). Use a new MODEL_DIR, or restore the original settings.")

  # ----------------------------------------------------------------------------- per method/phase
  def config_for(self, method: str, index: int) -> ModelConfig:
    """The model of ``method`` during phase ``index``."""
    spec = baselines.get_method(method)
    if spec.dense:
      return baselines.dense_config(self.base_config, self.options.dense_mlp_dim)
    if spec.expand:
      added = sum(p.add_experts for p in self.schedule.phases[1:index + 1])
      return surgery.expanded_config(self.base_config, added)
    return self.base_config

  def mixture_for(self, method: str, index: int) -> str:
    """The seqio task/mixture ``method`` trains on in phase ``index`` (registers it if needed)."""
    spec = baselines.get_method(method)
    phases = self.schedule.phases
    if spec.joint:
      return baselines.register_joint_mixture([p.mixture for p in phases])
    if spec.replay and index > 0:
      return baselines.register_replay_mixture(
          phases[index].mixture, [p.mixture for p in phases[:index]], self.options.replay_fraction)
    return phases[index].mixture

  def is_shared(self, method: str, index: int) -> bool:
    return index == 0 and self.share_first_phase and baselines.get_method(method).shares_first_phase

  def phase_dir(self, method: str, index: int) -> str:
    phase = self.schedule.phases[index]
    folder = f"phase_{index}_{phase.name}"
    if self.is_shared(method, index):
      return os.path.join(self.model_dir, SHARED_DIR, folder)
    return os.path.join(self.model_dir, method, folder)

  def model(self, config: ModelConfig) -> lm.LanguageModel:
    return lm.LanguageModel(config)

  def _metadata_info(self, method: str, index: int, record: PhaseRecord | None) -> dict[str, Any]:
    phase = self.schedule.phases[index]
    return {"method": "shared" if self.is_shared(method, index) else method,
            "phase_index": index, "phase_name": phase.name,
            "mixture": self.mixture_for(method, index),
            "start_step": self.schedule.start_step(index),
            "end_step": self.schedule.end_step(index),
            "phase_record": record.to_dict() if record is not None else None}

  def _first_record(self, method: str) -> PhaseRecord | None:
    config = self.config_for(method, 0)
    if not config.is_moe:
      return None
    phase = self.schedule.phases[0]
    return PhaseRecord.start(phase.name, mixture=self.mixture_for(method, 0), steps=phase.steps,
                             method="shared" if self.is_shared(method, 0) else method,
                             num_experts=config.num_experts)

  def final_step_dir(self, method: str, index: int) -> str:
    """The final checkpoint of phase ``index`` of ``method`` (must exist)."""
    pdir = self.phase_dir(method, index)
    end = self.schedule.end_step(index)
    try:
      return checkpoints.resolve_step_dir(pdir, step=end)
    except checkpoints.CheckpointNotFoundError as e:
      raise LifelongError(f"Phase {index} of {method} has no final checkpoint at step {end} in "
                          f"{pdir}: {e}") from e

  # ----------------------------------------------------------------------------- phase start
  def _prepare_phase(self, method: str, index: int) -> None:
    """Builds the step-0 checkpoint of phase ``index > 0`` (surgery etc.), atomically."""
    pdir = self.phase_dir(method, index)
    if os.path.isdir(pdir):
      return
    spec = baselines.get_method(method)
    phase = self.schedule.phases[index]
    tmp = pdir + ".tmp"
    if _primary() and os.path.exists(tmp):
      logging.info("Removing the unfinished phase start %s (interrupted before completion).", tmp)
      shutil.rmtree(tmp)
    _sync(f"prepare-clean-{method}-{index}")
    prev_dir = self.final_step_dir(method, index - 1)
    prev_meta = checkpoints.read_metadata(prev_dir)
    prev_config = self.config_for(method, index - 1)
    new_config = self.config_for(method, index)
    prev_model = self.model(prev_config)
    prev_trainer = trainer_lib.Trainer(prev_model, self.partitioner, self.optimizer,
                                       seed=self.schedule.seed)
    state = checkpoints.restore_tree(prev_dir, prev_trainer.abstract_state,
                                     model_config=dataclasses.asdict(prev_config))
    info = prev_meta.get(METADATA_KEY) or {}
    record_dict = info.get("phase_record")
    record = PhaseRecord.from_dict(record_dict) if record_dict else None
    mixture = self.mixture_for(method, index)
    params, opt_state = state.params, state.opt_state
    add = phase.add_experts if spec.expand else 0
    t0 = time.perf_counter()
    if record is not None:
      if add:
        source: Any = "round_robin"
        if self.options.expert_init == "copy" and self.options.source_experts == "usage":
          evaluator = phase_eval.PhaseEvaluator(
              prev_model, self.partitioner, (), self.schedule.task_feature_lengths,
              self.schedule.eval_batch, data_dir=self.data_dir)
          source = evaluator.expert_usage(params, mixture, self.options.usage_batches)
        result = surgery.expand_for_phase(
            params, prev_trainer.params_axes, record, phase_name=phase.name, mixture=mixture,
            steps=phase.steps, method=method, add_experts=add, init=self.options.expert_init,
            rng=jax.random.fold_in(jax.random.PRNGKey(self.schedule.seed), index),
            noise_scale=self.options.noise_scale, source_experts=source,
            model_for_random_init=self.model(new_config), opt_state=opt_state,
            tx=self.optimizer.tx)
        params, opt_state, record = result.params, result.opt_state, result.record
        logging.info("[%s] surgery for phase %s: %d -> %d experts per MoE layer (%.1f s).",
                     method, phase.name, prev_config.num_experts, new_config.num_experts,
                     time.perf_counter() - t0)
      else:
        surgery.check_not_already_expanded(record, phase.name, params, prev_trainer.params_axes)
        record = record.append_phase(phase.name, mixture=mixture, steps=phase.steps,
                                     method=method, add_experts=0)
    if spec.penalty == "ewc":
      self._save_fisher(method, index, prev_model, state.params, tmp)
    new_state = ts.TrainState(step=state.step, params=params, opt_state=opt_state, rng=state.rng)
    metadata = {"vocabulary_fingerprint": self.fingerprint,
                "model_config": dataclasses.asdict(new_config), "optimizer": self.optimizer.name,
                "mesh": dict(self.mesh.shape), "process_count": jax.process_count(),
                METADATA_KEY: self._metadata_info(method, index, record)}
    checkpoints.save_state(tmp, int(state.step), new_state, metadata)
    _sync(f"prepare-saved-{method}-{index}")
    if _primary():
      os.replace(tmp, pdir)
    _sync(f"prepare-renamed-{method}-{index}")
    logging.info("[%s] phase %d (%s) starts from %s (step %d).", method, index, phase.name, pdir,
                 int(state.step))

  def _save_fisher(self, method: str, index: int, prev_model: lm.LanguageModel, prev_params: PyTree,
                   tmp: str) -> None:
    """EWC: Fisher of the previous phase (its data, its final params) + the earlier accumulated
    Fisher, saved to ``tmp/ewc_fisher``."""
    t0 = time.perf_counter()
    ds = pipeline.get_dataset(
        self.mixture_for(method, index - 1), self.schedule.task_feature_lengths, "train",
        self.schedule.batch_size // jax.process_count(), shuffle=True,
        seed=self.schedule.seed + 7919, repeat=True, shard_index=jax.process_index(),
        num_shards=jax.process_count(), data_dir=self.data_dir)
    sharding = self.partitioner.batch_sharding()
    batches = ({k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}
               for b in ds.as_numpy_iterator())
    with self.partitioner.context():
      fisher = penalties.estimate_fisher(prev_model, prev_params, batches,
                                         num_batches=self.options.fisher_batches)
    earlier = os.path.join(self.phase_dir(method, index - 1), FISHER_DIR)
    if os.path.isdir(earlier):
      fisher = jax.tree_util.tree_map(
          jnp.add, baselines.load_fisher(earlier, _float32_like(prev_params)), fisher)
    baselines.save_fisher(os.path.join(tmp, FISHER_DIR), fisher)
    logging.info("[%s] EWC Fisher for phase %d estimated on %d batches (%.1f s).", method, index,
                 self.options.fisher_batches, time.perf_counter() - t0)

  # ----------------------------------------------------------------------------- training
  def _restore_params(self, model: lm.LanguageModel, step_dir: str) -> PyTree:
    """Params of a checkpoint, read directly into their shardings on the run's mesh."""
    return checkpoints.restore_params(
        step_dir, evaluation.sharded_abstract_params(model, self.partitioner),
        model_config=dataclasses.asdict(model.config))

  def _regularizers(self, method: str, index: int) -> list:
    """Distillation from / penalties towards the previous phase's final params."""
    spec = baselines.get_method(method)
    if index == 0 or not (spec.distill or spec.penalty):
      return []
    regs = []
    prev_model = self.model(self.config_for(method, index - 1))
    prev_params = self._restore_params(prev_model, self.final_step_dir(method, index - 1))
    if spec.distill:
      regs.append(distill.Distillation(prev_model, prev_params,
                                       temperature=self.options.distill_temperature,
                                       weight=self.options.distill_weight))
    if spec.penalty == "l2":
      add = self.schedule.phases[index].add_experts if spec.expand else 0
      anchor = penalties.l2_anchor(prev_params).expand_to(prev_model.params_logical_axes(), add)
      regs.append(penalties.L2Penalty(self.options.l2_weight, anchor))
    elif spec.penalty == "ewc":
      fisher_dir = os.path.join(self.phase_dir(method, index), FISHER_DIR)
      fisher = baselines.load_fisher(fisher_dir, _float32_like(prev_params))
      regs.append(penalties.EWCPenalty(self.options.ewc_weight,
                                       penalties.ewc_anchor(prev_params, fisher)))
    return regs

  def _optimizer_wrapper(self, method: str, index: int, record: PhaseRecord | None):
    spec = baselines.get_method(method)
    if index == 0 or not spec.freeze_old_experts or record is None:
      return None
    phase = self.schedule.phases[index]
    frozen = record.experts_before(phase.name)
    model = self.model(self.config_for(method, index))
    axes = model.params_logical_axes()
    abstract = nn.unbox(model.abstract_params())
    mask = freeze.freeze_mask(abstract, axes, frozen, freeze_shared=self.options.freeze_shared)
    frozen_entries, total = freeze.frozen_count(mask, abstract)
    logging.info("[%s] phase %s: experts [0, %d) and their router columns frozen%s (%d of %d "
                 "params).", method, phase.name, frozen,
                 " + all shared params" if self.options.freeze_shared else "", frozen_entries, total)
    return lambda tx: freeze.with_frozen(tx, mask)

  def _record_of_phase_start(self, method: str, index: int) -> PhaseRecord | None:
    """The phase record of the phase's start: checked against the step-0 metadata."""
    if index == 0:
      return self._first_record(method)
    pdir = self.phase_dir(method, index)
    try:   # every checkpoint of a phase carries the phase's record: read the latest one
      info = checkpoints.read_metadata(checkpoints.resolve_step_dir(pdir)).get(METADATA_KEY) or {}
    except checkpoints.CheckpointNotFoundError as e:
      raise LifelongError(f"{pdir} exists but holds no checkpoint ({e}); delete it to rebuild the "
                          "phase start.") from e
    if info.get("phase_index") != index or info.get("phase_name") != self.schedule.phases[index].name:
      raise LifelongError(f"{pdir}: its checkpoint belongs to phase {info.get('phase_index')} "
                          f"({info.get('phase_name')}), not {index}.")
    record = info.get("phase_record")
    record = PhaseRecord.from_dict(record) if record else None
    config = self.config_for(method, index)
    if record is not None:
      if record.phases[-1].name != self.schedule.phases[index].name:
        raise LifelongError(f"{pdir}: the phase record ends with {record.phases[-1].name!r}, "
                            f"expected {self.schedule.phases[index].name!r}.")
      record.validate_expert_counts(config.num_experts)
    return record

  def run_phase(self, method: str, index: int) -> dict[str, Any]:
    """Trains and evaluates one phase (resuming or skipping as the folder says); returns its result."""
    phase = self.schedule.phases[index]
    pdir = self.phase_dir(method, index)
    result_path = os.path.join(pdir, RESULT_FILE)
    if os.path.exists(result_path):
      logging.info("[%s] phase %d (%s) already complete: %s", method, index, phase.name, pdir)
      return read_json(result_path)
    n = len(self.schedule.phases)
    config = self.config_for(method, index)
    logging.info("[%s] ===== phase %d/%d %s: %s, steps %d..%d, %s =====", method, index + 1, n,
                 phase.name, self.mixture_for(method, index), self.schedule.start_step(index),
                 self.schedule.end_step(index),
                 f"{config.num_experts} experts per MoE layer" if config.is_moe else "dense")
    t_start = time.perf_counter()
    if index > 0:
      self._prepare_phase(method, index)
    record = self._record_of_phase_start(method, index)
    t_train = time.perf_counter()
    result = train_lib.train(
        model_dir=pdir, mixture_or_task_name=self.mixture_for(method, index),
        task_feature_lengths=self.schedule.task_feature_lengths,
        train_steps=self.schedule.end_step(index), batch_size=self.schedule.batch_size,
        model_config=config, mesh_config=None, optimizer=self.optimizer,
        checkpoint_config=None, seed=self.schedule.seed, data_seed=self.schedule.seed + index,
        data_position="iterator", pack=True, data_dir=self.data_dir,
        summary_every_steps=self.summary_every_steps, log_every_steps=self.log_every_steps,
        eval_every_steps=0, regularizers=self._regularizers(method, index),
        optimizer_wrapper=self._optimizer_wrapper(method, index, record),
        extra_metadata={METADATA_KEY: self._metadata_info(method, index, record)})
    train_wall = time.perf_counter() - t_train
    logging.info("[%s] phase %d (%s) trained in %s; evaluating %d distributions.", method, index,
                 phase.name, metrics_lib.format_duration(train_wall), len(self.eval_tasks))
    params = result.state.params
    model = result.trainer.model
    if record is not None:
      record.validate_expert_counts(surgery.expert_counts(params, result.trainer.params_axes))
    t_eval = time.perf_counter()
    evaluator = phase_eval.PhaseEvaluator(
        model, result.trainer.partitioner, self.eval_tasks, self.schedule.task_feature_lengths,
        self.schedule.eval_batch, max_batches=self.schedule.eval_max_batches,
        data_dir=self.data_dir, batch_cache=self._eval_batch_cache)
    evals = evaluator.evaluate(params)
    for task, values in evals.items():
      logging.info("[%s] after %s | %s | loss %.4f | perplexity %.2f", method, phase.name, task,
                   values["loss"], values["perplexity"])
    ctx = PhaseContext(method, index, phase, model, params, result.trainer.partitioner,
                       self.vocabulary, pdir)
    callback_results = {name: _jsonable(fn(ctx)) for name, fn in self.callbacks.items()}
    eval_wall = time.perf_counter() - t_eval
    train, timing = train_summary(os.path.join(pdir, "train", "metrics.jsonl"),
                                  self.schedule.start_step(index), self.schedule.end_step(index))
    timing.update(train_wall_s=train_wall, eval_wall_s=eval_wall,
                  phase_wall_s=time.perf_counter() - t_start,
                  trained_steps_this_invocation=int(result.state.step) - result.start_step)
    out = {
        "format_version": RESULT_FORMAT_VERSION, "method": method,
        "trained_by": "shared" if self.is_shared(method, index) else method,
        "phase_index": index, "phase": phase.name, "mixture": phase.mixture,
        "trained_on": self.mixture_for(method, index), "steps": phase.steps,
        "start_step": self.schedule.start_step(index), "end_step": self.schedule.end_step(index),
        "num_experts": config.num_experts,
        "experts_per_layer": [config.num_experts] * config.num_moe_layers,
        "expert_slices": ({k: list(v) for k, v in record.expert_slices().items()}
                          if record is not None else {}),
        "num_params": ts.param_count(params),
        "eval": evals, "train": train, "callbacks": callback_results, "timing": timing}
    if _primary():
      write_json_atomic(result_path, out)
    _sync(f"phase-done-{method}-{index}")
    return out

  # ----------------------------------------------------------------------------- whole run
  def run(self) -> dict[str, Any]:
    """Runs every method's phases (skipping complete ones), writing the report after each phase.

    Returns:
      The report (``report.json`` content).
    """
    self._enable_compilation_cache()
    if _primary():
      os.makedirs(self.model_dir, exist_ok=True)
      path = os.path.join(self.model_dir, RUN_FILE)
      if not os.path.exists(path):
        write_json_atomic(path, self.run_identity())
    _sync("run-file")
    t0 = time.perf_counter()
    total = len(self.methods) * len(self.schedule.phases)
    done = 0
    for method in self.methods:
      for index in range(len(self.schedule.phases)):
        self.run_phase(method, index)
        done += 1
        self.write_report()
        elapsed = time.perf_counter() - t0
        logging.info("Lifelong run: %d/%d phases done, %s elapsed, ETA %s.", done, total,
                     metrics_lib.format_duration(elapsed),
                     metrics_lib.format_duration(elapsed / done * (total - done)))
    return self.write_report()

  def _enable_compilation_cache(self) -> None:
    """Points JAX's persistent compilation cache at ``compilation_cache_dir`` (see __init__)."""
    path = self.compilation_cache_dir
    if path is None or jax.config.jax_compilation_cache_dir:
      return
    if path == "auto":
      path = os.path.join(self.model_dir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    logging.info("JAX persistent compilation cache: %s", path)

  def collect_results(self) -> dict[str, list[dict[str, Any]]]:
    """``{method: [phase results so far]}`` read from the phase folders (methods of this run
    first, then any other method folder of MODEL_DIR with results)."""
    names = list(self.methods)
    if os.path.isdir(self.model_dir):
      for entry in sorted(os.listdir(self.model_dir)):
        if entry not in names and entry in baselines.METHODS and os.path.isdir(
            os.path.join(self.model_dir, entry)):
          names.append(entry)
    results: dict[str, list[dict[str, Any]]] = {}
    for method in names:
      phases = []
      for index in range(len(self.schedule.phases)):
        path = os.path.join(self.phase_dir(method, index), RESULT_FILE)
        if not os.path.exists(path):
          break
        result = read_json(path)
        result["method"] = method
        phases.append(result)
      if phases:
        results[method] = phases
    return results

  def write_report(self) -> dict[str, Any]:
    """Rebuilds ``report.json``, ``report.md`` and the PNGs from the phase results on disk."""
    results = self.collect_results()
    report = report_lib.build_report(
        schedule=self.schedule.to_dict(), model_config=dataclasses.asdict(self.base_config),
        options=self.options.to_dict(), eval_tasks=self.eval_tasks,
        phase_tasks=[evaluation.eval_task_names(p.mixture) for p in self.schedule.phases],
        results=results, method_specs=baselines.describe(list(results)))
    if _primary():
      report_lib.write_report(self.model_dir, report)
    _sync("report")
    return report


def run_lifelong(model_dir: str, methods: Sequence[str] | None = None,
                 data_dir: str | None = None, **kwargs) -> dict[str, Any]:
  """Builds a ``LifelongRunner`` (gin supplies the rest) and runs it; returns the report."""
  return LifelongRunner(model_dir=model_dir, methods=methods, data_dir=data_dir, **kwargs).run()
