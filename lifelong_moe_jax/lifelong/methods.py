"""Lifelong methods (Lifelong-MoE and its baselines) as objects the runner asks what to do.

A ``Method`` says what happens at the start of every phase after the first one:

=================  ======  ======  =======  =======  ==================================================
name               expand  freeze  distill  penalty  data / model
=================  ======  ======  =======  =======  ==================================================
``lifelong_moe``   yes     yes     yes      -        the phase's data (Chen et al., 2023)
``finetune``       -       -       -        -        the phase's data, same model
``expand_only``    yes     -       -        -        the phase's data
``expand_freeze``  yes     yes     -        -        the phase's data
``distill_only``   -       -       yes      -        the phase's data (LwF)
``l2``             -       -       -        L2       the phase's data (online L2 to the previous params)
``ewc``            -       -       -        EWC      the phase's data (diagonal Fisher, accumulated)
``replay``         -       -       -        -        the phase's data + ``replay_fraction`` of earlier
                                                     phases' data (breaks the no-old-data assumption)
``multitask``      -       -       -        -        every phase trains on the union of all phases'
                                                     data at equal rates (joint-training reference)
``multitask_final`` -      -       -        -        as ``multitask``, with the final expert count
                                                     (every phase's added experts) from phase 0 on
``dense_finetune`` -       -       -        -        a dense model (FLOP-matched) fine-tuned
=================  ======  ======  =======  =======  ==================================================

* expand: the phase's ``add_experts`` are added to every MoE layer
  (``phase_expansion.expand_for_phase``); methods that do not expand keep the first phase's expert
  count, except ``final_experts`` ones (``multitask_final``), whose model has the schedule's final
  expert count throughout.
* freeze: the expert slices and router columns of earlier phases get exactly zero updates
  (``freeze.with_frozen``); ``MethodOptions.freeze_shared`` also freezes every non-expert param.
* distill: ``T^2 KL(teacher || student)`` to the previous phase's final model (``distill``), on the
  new batch or on the teacher's own samples (``distill_inputs``, ``pseudo_rehearsal``).
* penalty: quadratic pull towards the previous phase's final params (``penalties``).

Each method is a ``Method`` object that builds, for phase ``i`` of a schedule, its own model config
(``model_config``), training data (``mixture``), the work done when the phase starts
(``expert_init`` and ``prepare_phase_start``, e.g. the EWC Fisher), the loss terms
(``regularizers``) and the optimizer wrapper (``optimizer_wrapper``, freezing). The runner only
sequences phases. Custom recipes subclass ``Method`` (or set its flags) and ``register_method`` them.
Hyperparameters live in ``MethodOptions`` (gin; ``method_options``), their one home; the replay
and joint mixtures are built by ``method_mixtures``, the EWC Fisher by ``ewc_fisher``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn

from lifelong_moe_jax import partitioning
from lifelong_moe_jax.lifelong import distill
from lifelong_moe_jax.lifelong import ewc_fisher
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import freeze
from lifelong_moe_jax.lifelong import method_mixtures
from lifelong_moe_jax.lifelong import new_expert_balance
from lifelong_moe_jax.lifelong import penalties
from lifelong_moe_jax.lifelong import pseudo_rehearsal
from lifelong_moe_jax.lifelong import router_projection
from lifelong_moe_jax.lifelong import router_rehearsal
from lifelong_moe_jax.lifelong.dense_reference import dense_config, dense_mlp_dim  # noqa: F401
from lifelong_moe_jax.lifelong.method_options import MethodError, MethodOptions
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig

PyTree = Any
PENALTIES = (None, "l2", "ewc")


@dataclasses.dataclass(frozen=True)
class PhaseSetup:
  """What a method sees when phase ``index`` (> 0) starts.

  Attributes:
    schedule: the run's schedule.
    index: the phase index.
    options: the method hyperparameters.
    base_config: the first phase's model (the schedule's ``ModelConfig``).
    partitioner: the run's mesh and rules.
    data_dir: prepared data dir (None: the usual resolution).
    phase_dir: the phase's run folder (the trainer's MODEL_DIR).
    previous_phase_dir: the previous phase's run folder.
    previous_params: ``() -> params`` of the previous phase's final checkpoint (sharded; restored
      once per phase and cached by the runner).
    record: the phase record at the phase start (None for dense models).
    data_shards: input shards of a global batch (None: the process count; see
      ``training.run.resolve_data_shards``).
    earlier_router_moments: ``(mean [P, M, d], second_moment [P, M, d, d])`` of the earlier
      distributions' router inputs when the phase start already measured them (copy_contrast),
      else None (``router_rehearsal.save_accumulated_moments`` measures them).
  """

  schedule: LifelongSchedule
  index: int
  options: "MethodOptions"
  base_config: ModelConfig
  partitioner: partitioning.Partitioner
  data_dir: str | None
  phase_dir: str
  previous_phase_dir: str
  previous_params: Callable[[], PyTree]
  record: PhaseRecord | None
  data_shards: int | None = None
  earlier_router_moments: tuple[Any, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A lifelong recipe (see the module docstring for the built-in ones).

  The flags describe the recipe (and are reported); the methods below turn them into the objects
  the runner uses. Subclasses may override any of them.

  Attributes:
    name: identifier used in gin, folder names and the report.
    description: one line for the report.
    expand: apply each phase's ``add_experts``.
    freeze_old_experts: zero updates for earlier phases' expert slices and router columns.
    distill: distill from the previous phase's final model.
    penalty: None, "l2" or "ewc".
    replay: mix earlier phases' data into each phase (``MethodOptions.replay_fraction``).
    joint: every phase trains on the union of all phases' data (multitask).
    dense: train a dense model (``num_experts = 0``) instead of the MoE model.
    final_experts: the model has the schedule's final expert count (E0 plus every phase's
      ``add_experts``) from phase 0 on, without expanding (a fair-size joint-training reference).
    option_overrides: ``((field, value), ...)`` of ``MethodOptions`` this method uses instead of
      the run's (``method_variant``, e.g. ``lifelong_moe`` at another distillation weight).
    base: the method this one is a variant of (``method_variant``); None for built-in methods.
  """

  name: str
  description: str
  expand: bool = False
  freeze_old_experts: bool = False
  distill: bool = False
  penalty: str | None = None
  replay: bool = False
  joint: bool = False
  dense: bool = False
  final_experts: bool = False
  option_overrides: tuple[tuple[str, Any], ...] = ()
  base: str | None = None

  def __post_init__(self):
    known = {f.name for f in dataclasses.fields(MethodOptions)} if self.option_overrides else ()
    unknown = sorted(k for k, _ in self.option_overrides if k not in known)
    if unknown:
      raise MethodError(
        f"Method {self.name!r}: unknown MethodOptions field(s) {unknown}; known: {sorted(known)}."
      )
    if self.penalty not in PENALTIES:
      raise MethodError(
        f"Method {self.name!r}: penalty must be one of {PENALTIES}, got {self.penalty!r}."
      )
    if self.dense and (self.expand or self.freeze_old_experts):
      raise MethodError(f"Method {self.name!r}: a dense model has no experts to expand or freeze.")
    if self.freeze_old_experts and not self.expand:
      raise MethodError(
        f"Method {self.name!r}: freezing old experts without adding new ones would "
        "freeze every expert; set expand=True."
      )
    if self.penalty == "ewc" and self.expand:
      raise MethodError(
        f"Method {self.name!r}: EWC with expert expansion is not supported (the "
        "accumulated Fisher would need growing); use penalty='l2' or expand=False."
      )
    if self.final_experts and (self.expand or self.dense):
      raise MethodError(
        f"Method {self.name!r}: final_experts starts at the final expert count; it "
        "does not combine with expand or dense."
      )
    if self.joint and (self.replay or self.distill or self.penalty):
      raise MethodError(
        f"Method {self.name!r}: joint training already sees all data; it does not "
        "combine with replay, distillation or penalties."
      )

  @property
  def shares_first_phase(self) -> bool:
    """Whether its first phase is plain training of the MoE model on the first phase's data
    (identical for every such method, so the runner can train it once)."""
    return not (self.joint or self.dense)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["option_overrides"] = dict(self.option_overrides)
    return out

  def options(self, run_options: "MethodOptions") -> "MethodOptions":
    """The run's options with this method's ``option_overrides`` applied (validated)."""
    if not self.option_overrides:
      return run_options
    return dataclasses.replace(run_options, **dict(self.option_overrides))

  # ----------------------------------------------------------------------------- per phase
  def validate(
    self,
    schedule: LifelongSchedule,
    base_config: ModelConfig,
    options: "MethodOptions | None" = None,
  ) -> None:
    """Refuses schedules (and, given, the method's options) this method cannot run (called before
    anything is written)."""
    if (
      options is not None
      and options.router_rehearsal_weight > 0
      and options.router_rehearsal_inputs == "teacher_samples"
      and not (self.distill and self.expand)
    ):
      raise MethodError(
        f"Method {self.name!r}: router_rehearsal_inputs = 'teacher_samples' needs a method that "
        "adds experts and distils on the teacher's samples (e.g. lifelong_moe with "
        "distill_inputs = 'teacher_samples'); use router_rehearsal_inputs = 'gaussian' here."
      )
    if (self.expand or self.final_experts) and not base_config.is_moe:
      raise MethodError(
        f"Method {self.name!r} adds experts but the model is dense (ModelConfig.num_experts = 0)."
      )
    if self.freeze_old_experts:
      empty = [p.name for p in schedule.phases[1:] if p.add_experts <= 0]
      if empty:
        raise MethodError(
          f"Method {self.name!r} freezes every existing expert at a phase start, but phase(s) "
          f"{empty} add no experts, so all experts would be frozen and only shared weights "
          "would train. Give those phases add_experts > 0, or use a method that does not freeze "
          "(e.g. distill_only)."
        )

  def added_experts(self, schedule: LifelongSchedule, index: int) -> int:
    """Experts added to every MoE layer at the start of phase ``index``."""
    return schedule.phases[index].add_experts if self.expand and index > 0 else 0

  def model_config(
    self, base_config: ModelConfig, schedule: LifelongSchedule, index: int, options: "MethodOptions"
  ) -> ModelConfig:
    """The model during phase ``index``."""
    if self.dense:
      return dense_config(base_config, options.dense_mlp_dim)
    if self.final_experts:
      added = sum(p.add_experts for p in schedule.phases[1:])
    else:
      added = sum(self.added_experts(schedule, i) for i in range(1, index + 1))
    return expansion.expanded_config(base_config, added) if added else base_config

  def mixture(self, schedule: LifelongSchedule, index: int, options: "MethodOptions") -> str:
    """The seqio task/mixture trained in phase ``index`` (registers it if needed)."""
    phases = schedule.phases
    if self.joint:
      return method_mixtures.register_joint_mixture([p.mixture for p in phases])
    if self.replay and index > 0:
      return method_mixtures.register_replay_mixture(
        phases[index].mixture, [p.mixture for p in phases[:index]], options.replay_fraction
      )
    return phases[index].mixture

  def prepare_phase_start(self, setup: PhaseSetup, start_dir: str) -> None:
    """Work saved with the phase's step-0 checkpoint in ``start_dir`` (the temporary phase folder,
    renamed to ``setup.phase_dir`` once complete): the EWC Fisher of the previous phase; the
    earlier distributions' mean router inputs (``project_new_router_updates``) and router-input
    moments (``router_rehearsal_weight``, ``router_init="copy_contrast"``); the teacher's sample
    rows (``distill_inputs`` "teacher_samples" or "both")."""
    if self.penalty == "ewc":
      ewc_fisher.save_accumulated_fisher(self, setup, start_dir)
    if self.distill and setup.options.distill_inputs != "batch":
      pseudo_rehearsal.save_teacher_samples(self, setup, start_dir)
    if self._projects_router(setup):
      router_projection.save_accumulated_means(self, setup, start_dir)
    if self._saves_router_moments(setup):
      router_rehearsal.save_accumulated_moments(self, setup, start_dir)

  def _rehearses_router(self, setup: PhaseSetup) -> bool:
    return bool(
      setup.options.router_rehearsal_weight > 0 and self.added_experts(setup.schedule, setup.index)
    )

  def _saves_router_moments(self, setup: PhaseSetup) -> bool:
    # copy_contrast reads the earlier distributions' moments saved with the previous phase.
    gaussian = setup.options.router_rehearsal_inputs == "gaussian"
    return (self._rehearses_router(setup) and gaussian) or (
      setup.options.router_init == "copy_contrast" and self.expand
    )

  def _projects_router(self, setup: PhaseSetup) -> bool:
    return bool(
      setup.options.project_new_router_updates and self.added_experts(setup.schedule, setup.index)
    )

  def regularizers(self, setup: PhaseSetup) -> list[Any]:
    """Loss terms of phase ``setup.index``: distillation from / penalties towards the previous
    phase's final params (router-level distillation with ``router_distill_weight``), and the
    new-expert load balance (``balance_new_experts_only``) and the router rehearsal
    (``router_rehearsal_weight``), methods that add experts."""
    options = setup.options
    regs: list[Any] = []
    added = self.added_experts(setup.schedule, setup.index)
    if options.balance_new_experts_only and added:
      config = self.model_config(setup.base_config, setup.schedule, setup.index, options)
      regs.append(new_expert_balance.NewExpertBalance(config, config.num_experts - added))
    rehearsal = (
      router_rehearsal.phase_regularizer(self, setup, added)
      if self._rehearses_router(setup)
      else None
    )
    if rehearsal is not None and options.router_rehearsal_inputs == "gaussian":
      regs.append(rehearsal)
      rehearsal = None
    if not (self.distill or self.penalty):
      return regs
    prev_config = self.model_config(setup.base_config, setup.schedule, setup.index - 1, options)
    prev_model = lm.LanguageModel(prev_config)
    prev_params = setup.previous_params()
    if self.distill:
      teacher = prev_model
      if options.teacher_capacity == "train" and prev_config.is_moe:
        teacher = lm.LanguageModel(
          dataclasses.replace(prev_config, eval_capacity_factor=prev_config.train_capacity_factor)
        )
      kwargs = dict(
        temperature=options.distill_temperature,
        weight=options.distill_weight,
        router_weight=options.router_distill_weight,
      )
      if options.distill_inputs == "batch":
        regs.append(distill.Distillation(teacher, prev_params, **kwargs))
      else:
        regs.append(
          pseudo_rehearsal.phase_distillation(
            setup, teacher, prev_params, router_rehearsal=rehearsal, **kwargs
          )
        )
    if self.penalty == "l2":
      anchor = penalties.l2_anchor(prev_params).expand_to(
        prev_model.params_logical_axes(), self.added_experts(setup.schedule, setup.index)
      )
      regs.append(penalties.L2Penalty(options.l2_weight, anchor))
    elif self.penalty == "ewc":
      fisher = ewc_fisher.load_phase_fisher(setup.phase_dir, prev_params)
      regs.append(
        penalties.EWCPenalty(
          ewc_fisher.ewc_weight(setup.schedule, setup.index, options),
          penalties.ewc_anchor(prev_params, fisher),
        )
      )
    return regs

  def optimizer_wrapper(self, setup: PhaseSetup) -> Callable[[Any], Any] | None:
    """Freezing of earlier phases' experts and router columns (``freeze.with_frozen``), then the
    projection of the new router columns' updates (``project_new_router_updates``)."""
    if setup.record is None:
      return None
    freezes, projects = self.freeze_old_experts, self._projects_router(setup)
    if not (freezes or projects):
      return None
    phase = setup.schedule.phases[setup.index]
    first_new = setup.record.experts_before(phase.name)
    model = lm.LanguageModel(
      self.model_config(setup.base_config, setup.schedule, setup.index, setup.options)
    )
    abstract = nn.unbox(model.abstract_params())
    axes = model.params_logical_axes()
    mask = None
    if freezes:
      mask = freeze.freeze_mask(
        abstract, axes, first_new, freeze_shared=setup.options.freeze_shared
      )
      frozen_entries, total = freeze.frozen_count(mask, abstract)
      logging.info(
        "[%s] phase %s: experts [0, %d) and their router columns frozen%s (%d of %d params).",
        self.name,
        phase.name,
        first_new,
        " + all shared params" if setup.options.freeze_shared else "",
        frozen_entries,
        total,
      )
    bases = None
    if projects:
      bases = router_projection.phase_bases(self.name, setup.phase_dir, phase.name, first_new)

    def wrap(tx):
      tx = freeze.with_frozen(tx, mask) if mask is not None else tx
      if bases is not None:
        tx = router_projection.with_router_projection(tx, abstract, axes, bases, first_new)
      return tx

    return wrap


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  """Adds (or replaces) a method in ``METHODS``."""
  METHODS[method.name] = method
  return method


for _m in (
  Method(
    "lifelong_moe",
    "expand + freeze old experts/router columns + distill (Lifelong-MoE)",
    expand=True,
    freeze_old_experts=True,
    distill=True,
  ),
  Method("finetune", "same model, nothing frozen, no distillation"),
  Method("expand_only", "expand, nothing frozen, no distillation", expand=True),
  Method(
    "expand_freeze",
    "expand + freeze old experts/router columns",
    expand=True,
    freeze_old_experts=True,
  ),
  Method("distill_only", "distill from the previous phase (LwF), same model", distill=True),
  Method("l2", "online L2 penalty to the previous phase's params", penalty="l2"),
  Method("ewc", "EWC: Fisher-weighted penalty to the previous phase's params", penalty="ewc"),
  Method("replay", "replay a fraction of earlier phases' data (uses old data)", replay=True),
  Method(
    "multitask", "joint training on all phases' data (reference, first phase's experts)", joint=True
  ),
  Method(
    "multitask_final",
    "joint training on all phases' data with the final expert count from the start (reference)",
    joint=True,
    final_experts=True,
  ),
  Method("dense_finetune", "dense FLOP-matched model fine-tuned", dense=True),
):
  register_method(_m)


VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Recipe flags a variant may change besides MethodOptions values (e.g. lifelong_moe with replay).
VARIANT_RECIPE_FLAGS = ("expand", "freeze_old_experts", "distill", "penalty", "replay")


def method_variant(name: str, spec: Mapping[str, Any]) -> Method:
  """Registers and returns a variant of a registered method with its own ``MethodOptions`` values.

  Args:
    name: the variant's name (method list, folder and report name; letters, digits, ``_.-``).
    spec: ``{"base": "lifelong_moe", "description": "...", <MethodOptions field>: value, ...}``,
      e.g. ``{"base": "lifelong_moe", "distill_weight": 0.3}``; the recipe flags of
      ``VARIANT_RECIPE_FLAGS`` may be set too, e.g. ``{"base": "lifelong_moe", "replay": True}``
      (Lifelong-MoE that also replays ``replay_fraction`` of earlier phases' data).
  Raises:
    MethodError: bad name, unknown base, name of a built-in method, unknown or invalid option,
      a recipe flag combination ``Method`` refuses.
  """
  spec = dict(spec)
  if not isinstance(name, str) or not VARIANT_NAME.match(name):
    raise MethodError(
      f"Method variant name {name!r}: use letters, digits, '_', '.' or '-' (it names a folder)."
    )
  base_name = spec.pop("base", None)
  if base_name is None:
    raise MethodError(f"Method variant {name!r} needs a 'base' method, e.g. 'lifelong_moe'.")
  base = get_method(base_name)
  existing = METHODS.get(name)
  if existing is not None and existing.base is None:
    raise MethodError(f"Method variant {name!r} would replace the built-in method {name!r}.")
  description = spec.pop("description", None)
  flags = {k: spec.pop(k) for k in VARIANT_RECIPE_FLAGS if k in spec}
  for key, value in flags.items():
    if key != "penalty" and not isinstance(value, bool):
      raise MethodError(f"Method variant {name!r}: {key} must be true or false, got {value!r}.")
  overrides = dict(base.option_overrides)
  overrides.update(spec)
  changes = {**flags, **spec}
  variant = dataclasses.replace(
    base,
    name=name,
    description=description
    or f"{base.name} with " + ", ".join(f"{k}={v!r}" for k, v in sorted(changes.items())),
    option_overrides=tuple(sorted(overrides.items())),
    base=base.base or base.name,
    **flags,
  )
  variant.options(MethodOptions())  # field values validated now, before any work
  return register_method(variant)


def get_method(name: str) -> Method:
  """The registered method ``name``; raises MethodError listing the known ones."""
  if name not in METHODS:
    raise MethodError(f"Unknown lifelong method {name!r}; known: {sorted(METHODS)}.")
  return METHODS[name]


def describe(methods: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
  """``{name: Method.to_dict()}`` for the report."""
  return {name: get_method(name).to_dict() for name in methods}
