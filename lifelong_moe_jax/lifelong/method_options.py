"""Hyperparameters of the lifelong methods (gin: ``MethodOptions.distill_weight = 0.5``), their one
home; ``methods.Method.options`` applies a method variant's overrides to them."""

from __future__ import annotations

import dataclasses
from typing import Any

import gin

from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import penalties


DISTILL_INPUTS = ("batch", "teacher_samples", "both")
ROUTER_REHEARSAL_INPUTS = ("gaussian", "teacher_samples")
TEACHER_SAMPLE_POOLS = ("latest", "accumulated")


class MethodError(ValueError):
  """Unknown or inconsistent lifelong method."""


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
    ewc_weight: weight of the EWC penalty ``(w/2) sum F (theta - theta*)^2``; None (default): the
      earlier phases' train tokens per token of the phase (``ewc_fisher.bayesian_weight``, the
      Laplace posterior's weight; needs the per-token Fisher).
    fisher_batches: batches of the previous phase's train data for the Fisher estimate.
    fisher_estimator: ``penalties.estimate_fisher``'s estimator: "sampled_tokens" (default: the
      per-token Fisher with labels sampled from the model, accumulated over phases as a
      step-weighted mean) or "batch_gradient" (squared mean batch gradients, summed over phases:
      the runs before the change; its scale is about 1/(tokens per batch) of the per-token one,
      which the study's ewc_weight = 100 left ineffective, docs/study.md).
    replay_fraction: share of each replay phase's data drawn from earlier phases.
    dense_mlp_dim: MLP width of the dense model (default: FLOP-matched to the MoE model's
      activated feed-forward width, see ``dense_config``).
    router_init: router columns of new experts (``expansion.expand_params``): "copy" (as
      ``expert_init`` makes them: source column + noise, or the router initializer), "copy_offset"
      (copy init only: source column + noise ``- router_offset * mu / |mu|^2``, mu = mean router
      input of the new phase's train data under the previous model, so that on the new data the
      copy's logit is on average ``router_offset`` below its source's), "copy_contrast" (copy
      init only: source column + noise + a shift that puts the copy's logit on average
      ``router_offset`` above its source's on the new data and below it on the earlier
      distributions, along their linear discriminant: ``router_contrast``), "zero" or
      "small_random" (``N(0, (noise_scale * std(old kernel))^2)``).
      Default "copy_offset" (chosen by the study, docs/study.md: the only option that keeps the
      step-0 change on old distributions under 0.5%).
    router_offset: copy_offset / copy_contrast: the mean logit gap (>= 0); mu is measured on
      ``usage_batches`` batches of the phase's own data (never earlier phases' data; copy_contrast
      also uses the earlier distributions' moments, measured like EWC's Fisher). Default 2.0.
    new_slice_opt_state: optimizer statistics of new expert slices (``expand_opt_state``):
      "zeros", "source" (copy of the source expert's statistics; copy init only) or "mean" (mean
      of the old slices). Default "source" (with copy_offset: the least old-distribution traffic
      drifting to new experts in the study). Random init needs "mean" or "zeros".
    phase_warmup_steps: re-warm the learning rate linearly from 0 over this many steps at the
      start of every phase after the first (multiplies the base schedule); 0 disables.
    router_distill_weight: methods that distill: weight of the router-level distillation term,
      ``KL(teacher routing || student routing over the old experts)`` per MoE layer on the
      current batch (``distill.router_distillation_loss``); 0 disables.
    teacher_capacity: methods that distill: the expert capacity of the teacher's forward pass,
      "eval" (``eval_capacity_factor``, as the previous model is evaluated) or "train"
      (``train_capacity_factor``, as it was trained). The teacher is deterministic either way (no
      router jitter). On the demo model both cost the same step time on a quiet machine and give
      the same quality in the study (docs/performance.md, docs/study.md).
    balance_new_experts_only: methods that expand: the load-balancing loss balances the new
      data over the new experts only (the all-expert term is replaced by one over the phase's new
      experts, ``distill.NewExpertBalance``), so the router is not paid to move traffic from old
      experts to new ones.
    project_new_router_updates: methods that expand: every update of the phase's new router
      columns is projected orthogonal to the mean router inputs of the earlier distributions
      (``router_projection``; the means are measured when each phase starts, on the previous
      phase's data, and saved with the phase), so the new columns' logits on an average
      old-distribution token stay where the expansion put them.
    router_rehearsal_weight: methods that add experts: weight of the router rehearsal
      (``router_rehearsal``): on the batch, ``-log`` of the router probability of the new experts;
      on synthetic inputs drawn from Gaussians of the earlier distributions' router inputs
      (measured when each phase starts, on the previous phase's data, and saved with the phase),
      ``-log`` of the old experts' probability; 0 disables.
    router_rehearsal_samples: synthetic inputs per earlier distribution and MoE layer per step.
    router_rehearsal_inputs: the old inputs of the router rehearsal: "gaussian" (the synthetic
      inputs above) or "teacher_samples" (the router inputs of the teacher's sample rows in the
      student's forward pass that distils on them; needs ``distill_inputs`` "teacher_samples" or
      "both" and a method that distils).
    distill_inputs: methods that distill: the inputs the distillation KL is computed on,
      "batch" (the step's new-data batch, as Chen et al.), "teacher_samples" (rows of sequences
      sampled from the teacher when the phase starts: pseudo-rehearsal, ``pseudo_rehearsal``) or
      "both" (the sum of the two terms, each at ``distill_weight``).
    teacher_sample_rows: "teacher_samples"/"both": packed rows of the train length sampled from the
      teacher at each phase start (a step draws a train batch of them).
    teacher_sample_temperature: the sampling temperature of those rows (1 = the teacher's own
      distribution).
    teacher_sample_batch: rows of them per step (0: as many as the train batch); fewer cut the
      extra student step's cost proportionally.
    teacher_sample_pool: the rows a phase rehearses: "latest" (only the rows sampled from the
      previous phase's model) or "accumulated" (those plus every earlier phase's rows, so each
      earlier generator contributes ``teacher_sample_rows``: the latest model's samples lean to the
      latest distribution).
  """

  expert_init: str = "copy"
  noise_scale: float = 0.01
  source_experts: str = "round_robin"
  usage_batches: int = 4
  freeze_shared: bool = False
  distill_weight: float = 1.0
  distill_temperature: float = 1.0
  l2_weight: float = 0.01
  ewc_weight: float | None = None
  fisher_batches: int = 8
  fisher_estimator: str = "sampled_tokens"
  replay_fraction: float = 0.25
  dense_mlp_dim: int | None = None
  router_init: str = "copy_offset"
  router_offset: float = 2.0
  new_slice_opt_state: str = "source"
  phase_warmup_steps: int = 0
  router_distill_weight: float = 0.0
  balance_new_experts_only: bool = False
  teacher_capacity: str = "eval"
  project_new_router_updates: bool = False
  router_rehearsal_weight: float = 0.0
  router_rehearsal_samples: int = 256
  router_rehearsal_inputs: str = "gaussian"
  distill_inputs: str = "batch"
  teacher_sample_rows: int = 256
  teacher_sample_temperature: float = 1.0
  teacher_sample_batch: int = 0
  teacher_sample_pool: str = "latest"

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
    if self.fisher_estimator not in penalties.FISHER_ESTIMATORS:
      raise MethodError(
        f"MethodOptions.fisher_estimator must be one of {penalties.FISHER_ESTIMATORS}, got "
        f"{self.fisher_estimator!r}."
      )
    if self.ewc_weight is None and self.fisher_estimator != "sampled_tokens":
      raise MethodError(
        "MethodOptions.ewc_weight = None (the Bayesian weight) needs the per-token Fisher "
        "(fisher_estimator = 'sampled_tokens'); with 'batch_gradient' give a weight."
      )
    for name in ("noise_scale", "distill_weight", "l2_weight", "ewc_weight"):
      if getattr(self, name) is not None and getattr(self, name) < 0:
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
    if self.expert_init != "copy":
      needs_copy = [
        f"{name}={value!r}"
        for name, value in (
          ("router_init", self.router_init),
          ("new_slice_opt_state", self.new_slice_opt_state),
        )
        if value in ("copy_offset", "copy_contrast", "source")
      ]
      if needs_copy:
        raise MethodError(
          f"MethodOptions.expert_init={self.expert_init!r} has no source experts to copy, which "
          f"{' and '.join(needs_copy)} need (the defaults are 'copy_offset' and 'source'): with "
          "random init also set MethodOptions.router_init = 'copy' (or 'zero' / 'small_random') "
          "and MethodOptions.new_slice_opt_state = 'mean' (or 'zeros')."
        )
    if self.new_slice_opt_state not in expansion.NEW_SLICE_STATES:
      raise MethodError(
        f"MethodOptions.new_slice_opt_state must be one of "
        f"{expansion.NEW_SLICE_STATES}, got {self.new_slice_opt_state!r}."
      )
    if self.router_rehearsal_samples <= 0:
      raise MethodError(
        f"MethodOptions.router_rehearsal_samples must be positive, got "
        f"{self.router_rehearsal_samples}."
      )
    for name in (
      "router_offset",
      "router_distill_weight",
      "phase_warmup_steps",
      "router_rehearsal_weight",
    ):
      if getattr(self, name) < 0:
        raise MethodError(f"MethodOptions.{name} must be >= 0, got {getattr(self, name)}.")
    if self.distill_inputs not in DISTILL_INPUTS:
      raise MethodError(
        f"MethodOptions.distill_inputs must be one of {DISTILL_INPUTS}, got {self.distill_inputs!r}."
      )
    if self.teacher_sample_rows <= 0 or self.teacher_sample_temperature <= 0:
      raise MethodError(
        "MethodOptions.teacher_sample_rows and teacher_sample_temperature must be positive, got "
        f"{self.teacher_sample_rows} and {self.teacher_sample_temperature}."
      )
    if self.teacher_sample_batch < 0:
      raise MethodError(
        f"MethodOptions.teacher_sample_batch must be >= 0 (0: the train batch's), got "
        f"{self.teacher_sample_batch}."
      )
    if self.teacher_sample_pool not in TEACHER_SAMPLE_POOLS:
      raise MethodError(
        f"MethodOptions.teacher_sample_pool must be one of {TEACHER_SAMPLE_POOLS}, got "
        f"{self.teacher_sample_pool!r}."
      )
    if self.teacher_sample_pool == "accumulated" and self.distill_inputs == "batch":
      raise MethodError(
        "MethodOptions.teacher_sample_pool = 'accumulated' pools the teacher's sample rows, which "
        "distill_inputs = 'batch' does not draw: set distill_inputs to 'teacher_samples' or "
        "'both', or teacher_sample_pool = 'latest'."
      )
    if self.distill_inputs == "teacher_samples" and self.router_distill_weight > 0:
      raise MethodError(
        "MethodOptions.router_distill_weight acts on the new batch, which "
        "distill_inputs='teacher_samples' does not distil on: use distill_inputs='both' or "
        "router_distill_weight = 0."
      )
    if self.router_rehearsal_inputs not in ROUTER_REHEARSAL_INPUTS:
      raise MethodError(
        f"MethodOptions.router_rehearsal_inputs must be one of {ROUTER_REHEARSAL_INPUTS}, got "
        f"{self.router_rehearsal_inputs!r}."
      )
    if (
      self.router_rehearsal_inputs == "teacher_samples"
      and self.router_rehearsal_weight > 0
      and self.distill_inputs == "batch"
    ):
      raise MethodError(
        "MethodOptions.router_rehearsal_inputs = 'teacher_samples' rehearses on the teacher's "
        "sample rows, which distill_inputs = 'batch' does not draw: set distill_inputs to "
        "'teacher_samples' or 'both', or router_rehearsal_inputs = 'gaussian'."
      )
    if self.teacher_capacity not in ("eval", "train"):
      raise MethodError(
        f"MethodOptions.teacher_capacity must be 'eval' or 'train', got {self.teacher_capacity!r}."
      )
    for name in ("balance_new_experts_only", "project_new_router_updates"):
      if not isinstance(getattr(self, name), bool):
        raise MethodError(
          f"MethodOptions.{name} must be True or False, got {getattr(self, name)!r}."
        )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# What a run recorded before a field existed used: a ``lifelong_run.json`` written by an older
# version lacks these fields, and its phases ran with these values (not today's defaults).
LEGACY_OPTION_VALUES = {
  "router_init": "copy",
  "router_offset": 1.0,
  "new_slice_opt_state": "zeros",
  "phase_warmup_steps": 0,
  "router_distill_weight": 0.0,
  "balance_new_experts_only": False,
  "teacher_capacity": "eval",
  "project_new_router_updates": False,
  "router_rehearsal_weight": 0.0,
  "router_rehearsal_samples": 256,
  "router_rehearsal_inputs": "gaussian",
  "distill_inputs": "batch",
  "fisher_estimator": "batch_gradient",
  "teacher_sample_rows": 256,
  "teacher_sample_temperature": 1.0,
  "teacher_sample_batch": 0,
  "teacher_sample_pool": "latest",
}
