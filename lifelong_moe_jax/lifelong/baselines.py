"""Lifelong methods (Lifelong-MoE and its baselines) as named, gin-selectable recipes.

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
``dense_finetune`` -       -       -        -        a dense model (FLOP-matched) fine-tuned
=================  ======  ======  =======  =======  ==================================================

* expand: the phase's ``add_experts`` are added to every MoE layer (``surgery.expand_for_phase``);
  methods that do not expand keep the first phase's expert count.
* freeze: the expert slices and router columns of earlier phases get exactly zero updates
  (``freeze.with_frozen``); ``MethodOptions.freeze_shared`` also freezes every non-expert param.
* distill: ``T^2 KL(teacher || student)`` to the previous phase's final model (``distill``).
* penalty: quadratic pull towards the previous phase's final params (``penalties``).

Hyperparameters are in ``MethodOptions`` (gin). ``register_method`` adds custom recipes.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping, Sequence

import gin
import jax
import seqio

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.models.config import ModelConfig

PENALTIES = (None, "l2", "ewc")


class MethodError(ValueError):
  """Unknown or inconsistent lifelong method."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A lifelong recipe (see the module docstring for the built-in ones).

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

  def __post_init__(self):
    if self.penalty not in PENALTIES:
      raise MethodError(f"Method {self.name!r}: penalty must be one of {PENALTIES}, got "
                        f"{self.penalty!r}.")
    if self.dense and (self.expand or self.freeze_old_experts):
      raise MethodError(f"Method {self.name!r}: a dense model has no experts to expand or freeze.")
    if self.freeze_old_experts and not self.expand:
      raise MethodError(f"Method {self.name!r}: freezing old experts without adding new ones would "
                        "freeze every expert; set expand=True.")
    if self.penalty == "ewc" and self.expand:
      raise MethodError(f"Method {self.name!r}: EWC with expert expansion is not supported (the "
                        "accumulated Fisher would need growing); use penalty='l2' or expand=False.")
    if self.joint and (self.replay or self.distill or self.penalty):
      raise MethodError(f"Method {self.name!r}: joint training already sees all data; it does not "
                        "combine with replay, distillation or penalties.")

  @property
  def shares_first_phase(self) -> bool:
    """Whether its first phase is plain training of the MoE model on the first phase's data
    (identical for every such method, so the runner can train it once)."""
    return not (self.joint or self.dense)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  """Adds (or replaces) a method in ``METHODS``."""
  METHODS[method.name] = method
  return method


for _m in (
    Method("lifelong_moe", "expand + freeze old experts/router columns + distill (Lifelong-MoE)",
           expand=True, freeze_old_experts=True, distill=True),
    Method("finetune", "same model, nothing frozen, no distillation"),
    Method("expand_only", "expand, nothing frozen, no distillation", expand=True),
    Method("expand_freeze", "expand + freeze old experts/router columns", expand=True,
           freeze_old_experts=True),
    Method("distill_only", "distill from the previous phase (LwF), same model", distill=True),
    Method("l2", "online L2 penalty to the previous phase's params", penalty="l2"),
    Method("ewc", "EWC: Fisher-weighted penalty to the previous phase's params", penalty="ewc"),
    Method("replay", "replay a fraction of earlier phases' data (uses old data)", replay=True),
    Method("multitask", "joint training on all phases' data (reference)", joint=True),
    Method("dense_finetune", "dense FLOP-matched model fine-tuned", dense=True),
):
  register_method(_m)


def get_method(name: str) -> Method:
  """The registered method ``name``; raises MethodError listing the known ones."""
  if name not in METHODS:
    raise MethodError(f"Unknown lifelong method {name!r}; known: {sorted(METHODS)}.")
  return METHODS[name]


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

  def __post_init__(self):
    if self.expert_init not in ("copy", "random"):
      raise MethodError(f"MethodOptions.expert_init must be 'copy' or 'random', got "
                        f"{self.expert_init!r}.")
    if self.source_experts not in ("round_robin", "usage"):
      raise MethodError(f"MethodOptions.source_experts must be 'round_robin' or 'usage', got "
                        f"{self.source_experts!r}.")
    if not 0.0 < self.replay_fraction < 1.0:
      raise MethodError(f"MethodOptions.replay_fraction must be in (0, 1), got "
                        f"{self.replay_fraction}.")
    for name in ("noise_scale", "distill_weight", "l2_weight", "ewc_weight"):
      if getattr(self, name) < 0:
        raise MethodError(f"MethodOptions.{name} must be >= 0, got {getattr(self, name)}.")
    if self.distill_temperature <= 0:
      raise MethodError("MethodOptions.distill_temperature must be positive.")
    for name in ("usage_batches", "fisher_batches"):
      if getattr(self, name) <= 0:
        raise MethodError(f"MethodOptions.{name} must be positive.")

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
  return dataclasses.replace(config, num_experts=0, expert_mlp_dim=None,
                             mlp_dim=mlp_dim or dense_mlp_dim(config))


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


# ------------------------------------------------------------------------------- Fisher storage
def save_fisher(directory: str, fisher: Any) -> None:
  """Writes a Fisher pytree with orbax (sharded arrays are written shard by shard)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    ckptr.save(checkpoints.absolute(directory), args=ocp.args.PyTreeSave(fisher))


def load_fisher(directory: str, abstract: Any) -> Any:
  """Reads a Fisher pytree saved by ``save_fisher`` into ``abstract``'s shapes and shardings."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      abstract)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(checkpoints.absolute(directory), args=ocp.args.PyTreeRestore(abstract,
                                                                 restore_args=restore_args))


def describe(methods: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
  """``{name: Method.to_dict()}`` for the report."""
  return {name: get_method(name).to_dict() for name in methods}
