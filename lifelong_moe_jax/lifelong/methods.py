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

* expand: the phase's ``add_experts`` are added to every MoE layer (``expansion.expand_for_phase``);
  methods that do not expand keep the first phase's expert count, except ``final_experts`` ones
  (``multitask_final``), whose model has the schedule's final expert count throughout.
* freeze: the expert slices and router columns of earlier phases get exactly zero updates
  (``freeze.with_frozen``); ``MethodOptions.freeze_shared`` also freezes every non-expert param.
* distill: ``T^2 KL(teacher || student)`` to the previous phase's final model (``distill``).
* penalty: quadratic pull towards the previous phase's final params (``penalties``).

Each method is a ``Method`` object that builds, for phase ``i`` of a schedule, its own model config
(``model_config``), training data (``mixture``), the work done when the phase starts
(``expert_init`` and ``prepare_phase_start``, e.g. the EWC Fisher), the loss terms
(``regularizers``) and the optimizer wrapper (``optimizer_wrapper``, freezing). The runner only
sequences phases. Custom recipes subclass ``Method`` (or set its flags) and ``register_method`` them.
Hyperparameters live in ``MethodOptions`` (gin), their one home.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import seqio

from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.lifelong import distill
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import freeze
from lifelong_moe_jax.lifelong import new_expert_balance
from lifelong_moe_jax.lifelong import penalties
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig

PyTree = Any
PENALTIES = (None, "l2", "ewc")
FISHER_DIR = "ewc_fisher"


class MethodError(ValueError):
  """Unknown or inconsistent lifelong method."""


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

  def __post_init__(self):
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
    return dataclasses.asdict(self)

  # ----------------------------------------------------------------------------- per phase
  def validate(self, schedule: LifelongSchedule, base_config: ModelConfig) -> None:
    """Refuses schedules this method cannot run (called before anything is written)."""
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
      return register_joint_mixture([p.mixture for p in phases])
    if self.replay and index > 0:
      return register_replay_mixture(
        phases[index].mixture, [p.mixture for p in phases[:index]], options.replay_fraction
      )
    return phases[index].mixture

  def prepare_phase_start(self, setup: PhaseSetup, start_dir: str) -> None:
    """Work saved with the phase's step-0 checkpoint in ``start_dir`` (the temporary phase folder,
    renamed to ``setup.phase_dir`` once complete): the EWC Fisher of the previous phase."""
    if self.penalty == "ewc":
      _save_accumulated_fisher(self, setup, start_dir)

  def regularizers(self, setup: PhaseSetup) -> list[Any]:
    """Loss terms of phase ``setup.index``: distillation from / penalties towards the previous
    phase's final params (router-level distillation with ``router_distill_weight``), and the
    new-expert load balance (``balance_new_experts_only``, methods that add experts)."""
    options = setup.options
    regs: list[Any] = []
    added = self.added_experts(setup.schedule, setup.index)
    if options.balance_new_experts_only and added:
      config = self.model_config(setup.base_config, setup.schedule, setup.index, options)
      regs.append(new_expert_balance.NewExpertBalance(config, config.num_experts - added))
    if not (self.distill or self.penalty):
      return regs
    prev_config = self.model_config(setup.base_config, setup.schedule, setup.index - 1, options)
    prev_model = lm.LanguageModel(prev_config)
    prev_params = setup.previous_params()
    if self.distill:
      regs.append(
        distill.Distillation(
          prev_model,
          prev_params,
          temperature=options.distill_temperature,
          weight=options.distill_weight,
          router_weight=options.router_distill_weight,
        )
      )
    if self.penalty == "l2":
      anchor = penalties.l2_anchor(prev_params).expand_to(
        prev_model.params_logical_axes(), self.added_experts(setup.schedule, setup.index)
      )
      regs.append(penalties.L2Penalty(options.l2_weight, anchor))
    elif self.penalty == "ewc":
      fisher = penalties.load_fisher(
        os.path.join(setup.phase_dir, FISHER_DIR), _float32_like(prev_params)
      )
      regs.append(
        penalties.EWCPenalty(options.ewc_weight, penalties.ewc_anchor(prev_params, fisher))
      )
    return regs

  def optimizer_wrapper(self, setup: PhaseSetup) -> Callable[[Any], Any] | None:
    """Freezing of earlier phases' experts and router columns (``freeze.with_frozen``)."""
    if not self.freeze_old_experts or setup.record is None:
      return None
    phase = setup.schedule.phases[setup.index]
    frozen = setup.record.experts_before(phase.name)
    model = lm.LanguageModel(
      self.model_config(setup.base_config, setup.schedule, setup.index, setup.options)
    )
    abstract = nn.unbox(model.abstract_params())
    mask = freeze.freeze_mask(
      abstract, model.params_logical_axes(), frozen, freeze_shared=setup.options.freeze_shared
    )
    frozen_entries, total = freeze.frozen_count(mask, abstract)
    logging.info(
      "[%s] phase %s: experts [0, %d) and their router columns frozen%s (%d of %d params).",
      self.name,
      phase.name,
      frozen,
      " + all shared params" if setup.options.freeze_shared else "",
      frozen_entries,
      total,
    )
    return lambda tx: freeze.with_frozen(tx, mask)


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


def get_method(name: str) -> Method:
  """The registered method ``name``; raises MethodError listing the known ones."""
  if name not in METHODS:
    raise MethodError(f"Unknown lifelong method {name!r}; known: {sorted(METHODS)}.")
  return METHODS[name]


def describe(methods: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
  """``{name: Method.to_dict()}`` for the report."""
  return {name: get_method(name).to_dict() for name in methods}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """Hyperparameters shared by the methods (gin: ``MethodOptions.distill_weight = 0.5``).

  Attributes:
    expert_init: "copy" (from existing experts + noise) or "random" (layer initializer).
    noise_scale: copy init: noise std relative to the std of the copied slice.
    source_experts: copy init: "round_robin", or "usage" (new expert i copies the (i % E)-th most
      used expert of its layer, measured on the new phase's train data with the previous model).
    usage_batches: batches for the "usage" measurement.
    freeze_shared: methods that freeze also freeze every non-expert param.
    distill_weight / distill_temperature: lambda and T of the distillation term.
    l2_weight: weight of the L2 penalty ``(w/2) sum (theta - theta*)^2``.
    ewc_weight: weight of the EWC penalty ``(w/2) sum F (theta - theta*)^2``.
    fisher_batches: batches of the previous phase's train data for the Fisher estimate.
    replay_fraction: share of each replay phase's data drawn from earlier phases.
    dense_mlp_dim: MLP width of the dense model (default: FLOP-matched to the MoE model's
      activated feed-forward width, see ``dense_config``).
    router_init: router columns of new experts (``expansion.expand_params``): "copy" (as
      ``expert_init`` makes them: source column + noise, or the router initializer), "copy_offset"
      (copy init only: source column + noise ``- router_offset * mu / |mu|^2``, mu = mean router
      input of the new phase's train data under the previous model, so that on the new data the
      copy's logit is on average ``router_offset`` below its source's), "zero" or "small_random"
      (``N(0, (noise_scale * std(old kernel))^2)``).
    router_offset: copy_offset: the mean logit gap (>= 0); mu is measured on ``usage_batches``
      batches of the phase's own data (never earlier phases' data).
    new_slice_opt_state: optimizer statistics of new expert slices (``expand_opt_state``):
      "zeros", "source" (copy of the source expert's statistics; copy init only) or "mean" (mean
      of the old slices).
    phase_warmup_steps: re-warm the learning rate linearly from 0 over this many steps at the
      start of every phase after the first (multiplies the base schedule); 0 disables.
    router_distill_weight: methods that distill: weight of the router-level distillation term,
      ``KL(teacher routing || student routing over the old experts)`` per MoE layer on the
      current batch (``distill.router_distillation_loss``); 0 disables.
    balance_new_experts_only: methods that expand: the load-balancing loss balances the new
      data over the new experts only (the all-expert term is replaced by one over the phase's new
      experts, ``distill.NewExpertBalance``), so the router is not paid to move traffic from old
      experts to new ones.
  """

  expert_init: str = "copy"
  noise_scale: float = 0.01
  source_experts: str = "round_robin"
  usage_batches: int = 4
  freeze_shared: bool = False
  distill_weight: float = 1.0
  distill_temperature: float = 1.0
  l2_weight: float = 0.01
  ewc_weight: float = 100.0
  fisher_batches: int = 8
  replay_fraction: float = 0.25
  dense_mlp_dim: int | None = None
  router_init: str = "copy"
  router_offset: float = 1.0
  new_slice_opt_state: str = "zeros"
  phase_warmup_steps: int = 0
  router_distill_weight: float = 0.0
  balance_new_experts_only: bool = False

  def __post_init__(self):
    if self.expert_init not in ("copy", "random"):
      raise MethodError(
        f"MethodOptions.expert_init must be 'copy' or 'random', got {self.expert_init!r}."
      )
    if self.source_experts not in ("round_robin", "usage"):
      raise MethodError(
        f"MethodOptions.source_experts must be 'round_robin' or 'usage', got "
        f"{self.source_experts!r}."
      )
    if not 0.0 < self.replay_fraction < 1.0:
      raise MethodError(
        f"MethodOptions.replay_fraction must be in (0, 1), got {self.replay_fraction}."
      )
    for name in ("noise_scale", "distill_weight", "l2_weight", "ewc_weight"):
      if getattr(self, name) < 0:
        raise MethodError(f"MethodOptions.{name} must be >= 0, got {getattr(self, name)}.")
    if self.distill_temperature <= 0:
      raise MethodError("MethodOptions.distill_temperature must be positive.")
    for name in ("usage_batches", "fisher_batches"):
      if getattr(self, name) <= 0:
        raise MethodError(f"MethodOptions.{name} must be positive.")
    if self.router_init not in expansion.ROUTER_INITS:
      raise MethodError(
        f"MethodOptions.router_init must be one of {expansion.ROUTER_INITS}, got "
        f"{self.router_init!r}."
      )
    if self.router_init == "copy_offset" and self.expert_init != "copy":
      raise MethodError(
        "MethodOptions.router_init='copy_offset' offsets copied router columns: "
        "it needs expert_init='copy'."
      )
    if self.new_slice_opt_state not in expansion.NEW_SLICE_STATES:
      raise MethodError(
        f"MethodOptions.new_slice_opt_state must be one of "
        f"{expansion.NEW_SLICE_STATES}, got {self.new_slice_opt_state!r}."
      )
    if self.new_slice_opt_state == "source" and self.expert_init != "copy":
      raise MethodError(
        "MethodOptions.new_slice_opt_state='source' copies the source expert's "
        "statistics: it needs expert_init='copy' (use 'mean' with random init)."
      )
    for name in ("router_offset", "router_distill_weight", "phase_warmup_steps"):
      if getattr(self, name) < 0:
        raise MethodError(f"MethodOptions.{name} must be >= 0, got {getattr(self, name)}.")
    if not isinstance(self.balance_new_experts_only, bool):
      raise MethodError(
        f"MethodOptions.balance_new_experts_only must be True or False, got "
        f"{self.balance_new_experts_only!r}."
      )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- models
def dense_mlp_dim(config: ModelConfig) -> int:
  """MLP width of a dense model with the MoE model's activated feed-forward FLOPs per token.

  Dense layers use ``mlp_dim``; an MoE layer activates ``top_k`` experts of ``expert_hidden_dim``.
  The dense model uses the average over layers, e.g. (512 + 2 * 512) / 2 = 768 for the demo model.
  """
  if not config.is_moe:
    return config.mlp_dim
  moe = config.num_moe_layers
  total = (config.num_layers - moe) * config.mlp_dim + moe * config.top_k * config.expert_hidden_dim
  return int(round(total / config.num_layers))


def dense_config(config: ModelConfig, mlp_dim: int | None = None) -> ModelConfig:
  """The dense counterpart of ``config`` (``num_experts = 0``, FLOP-matched width by default)."""
  return dataclasses.replace(
    config, num_experts=0, expert_mlp_dim=None, mlp_dim=mlp_dim or dense_mlp_dim(config)
  )


# ------------------------------------------------------------------------------- data
def mixture_tasks(name: str) -> list[tuple[str, float]]:
  """``[(task, rate)]`` of a task (rate 1) or mixture (its rates, normalised to sum to 1)."""
  provider = pipeline.validate_task_name(name)
  if isinstance(provider, seqio.Mixture):
    pairs = [(t.name, float(provider.get_rate(t))) for t in provider.tasks]
    total = sum(r for _, r in pairs) or 1.0
    return [(t, r / total) for t, r in pairs]
  return [(provider.name, 1.0)]


def _register(name: str, pairs: Sequence[tuple[str, float]]) -> str:
  merged: dict[str, float] = {}
  for task, rate in pairs:
    merged[task] = merged.get(task, 0.0) + rate
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, sorted(merged.items()))
  return name


def _short_hash(*parts: Any) -> str:
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


def register_replay_mixture(current: str, earlier: Sequence[str], fraction: float) -> str:
  """Registers the mixture of a replay phase and returns its name.

  ``current``'s tasks get ``1 - fraction`` of the examples (at their own relative rates); the earlier
  phases' mixtures share ``fraction`` equally. With no earlier phase, ``current`` is returned.
  Deterministic: the same arguments give the same name and rates (re-registration replaces).
  """
  earlier = [m for m in earlier if m != current]
  if not earlier:
    return current
  pairs = [(t, (1.0 - fraction) * r) for t, r in mixture_tasks(current)]
  for mixture in earlier:
    pairs += [(t, fraction * r / len(earlier)) for t, r in mixture_tasks(mixture)]
  return _register(f"lifelong_replay_{_short_hash(current, tuple(earlier), fraction)}", pairs)


def register_joint_mixture(mixtures: Sequence[str]) -> str:
  """Registers the union of ``mixtures`` (each mixture an equal share) and returns its name."""
  unique = list(dict.fromkeys(mixtures))
  if len(unique) == 1:
    return unique[0]
  pairs = [(t, r / len(unique)) for m in unique for t, r in mixture_tasks(m)]
  return _register(f"lifelong_joint_{_short_hash(tuple(unique))}", pairs)


# ------------------------------------------------------------------------------- EWC Fisher
def _float32_like(params: PyTree) -> PyTree:
  """float32 ``ShapeDtypeStruct``s with the shapes and shardings of ``params``."""
  return jax.tree_util.tree_map(
    lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), params
  )


def _save_accumulated_fisher(method: Method, setup: PhaseSetup, start_dir: str) -> None:
  """EWC: Fisher of the previous phase (its data, its final params) plus the Fisher accumulated
  over earlier phases, saved to ``start_dir/ewc_fisher``."""
  t0 = time.perf_counter()
  schedule, options = setup.schedule, setup.options
  prev_model = lm.LanguageModel(
    method.model_config(setup.base_config, schedule, setup.index - 1, options)
  )
  prev_params = setup.previous_params()
  ds = pipeline.get_dataset(
    method.mixture(schedule, setup.index - 1, options),
    schedule.task_feature_lengths,
    "train",
    schedule.batch_size // jax.process_count(),
    shuffle=True,
    seed=schedule.seed + 7919,
    repeat=True,
    shard_index=jax.process_index(),
    num_shards=jax.process_count(),
    data_dir=setup.data_dir,
  )
  sharding = setup.partitioner.batch_sharding()
  batches = (
    {k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}
    for b in ds.as_numpy_iterator()
  )
  with setup.partitioner.context():
    fisher = penalties.estimate_fisher(
      prev_model, prev_params, batches, num_batches=options.fisher_batches
    )
  earlier = os.path.join(setup.previous_phase_dir, FISHER_DIR)
  if os.path.isdir(earlier):
    fisher = jax.tree_util.tree_map(
      jnp.add, penalties.load_fisher(earlier, _float32_like(prev_params)), fisher
    )
  penalties.save_fisher(os.path.join(start_dir, FISHER_DIR), fisher)
  logging.info(
    "[%s] EWC Fisher for phase %d estimated on %d batches (%.1f s).",
    method.name,
    setup.index,
    options.fisher_batches,
    time.perf_counter() - t0,
  )
