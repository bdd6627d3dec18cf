"""The training mixtures of the methods that mix data: ``replay`` (the phase's data plus a share of
earlier phases') and ``multitask`` (every phase's data at equal rates), registered in seqio under
deterministic names (``Method.mixture``)."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import seqio

from lifelong_moe_jax.data import pipeline


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
