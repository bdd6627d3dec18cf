"""EWC's Fisher diagonal: estimated on the previous phase's training data with its final params when
a phase starts, accumulated over phases and saved with the phase's step-0 checkpoint
(``<phase folder>/ewc_fisher``), so a resumed phase uses the same one.

With the per-token estimator (``MethodOptions.fisher_estimator = "sampled_tokens"``) the Fisher of
phase ``i`` is the step-weighted mean ``sum_{p<i} steps_p F_p / sum_{p<i} steps_p`` of the earlier
phases' per-token Fishers, and the default weight (``MethodOptions.ewc_weight = None``) is
``bayesian_weight``: the earlier phases' train tokens per token of this phase. The penalty is then
the Laplace approximation of the earlier phases' posterior, ``(1 / 2 N_i) sum_p N_p F_p (theta -
theta*)^2`` next to the mean token loss of phase ``i`` (N: tokens trained). The legacy
``"batch_gradient"`` estimator sums the earlier Fishers and takes ``ewc_weight`` as given."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from absl import logging
import jax
import jax.numpy as jnp

from lifelong_moe_jax.lifelong import penalties
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.training import run as run_lib

if TYPE_CHECKING:
  from lifelong_moe_jax.lifelong.methods import Method, PhaseSetup

PyTree = Any
FISHER_DIR = "ewc_fisher"


def float32_like(params: PyTree) -> PyTree:
  """float32 ``ShapeDtypeStruct``s with the shapes and shardings of ``params``."""
  return jax.tree_util.tree_map(
    lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), params
  )


def bayesian_weight(schedule: Any, index: int) -> float:
  """Tokens trained before phase ``index`` per token of phase ``index`` (one global batch size):
  ``sum_{p < index} steps_p / steps_index``."""
  phases = schedule.phases
  return float(sum(p.steps for p in phases[:index]) / phases[index].steps)


def ewc_weight(schedule: Any, index: int, options: Any) -> float:
  """``options.ewc_weight``, or ``bayesian_weight`` when it is None."""
  if options.ewc_weight is not None:
    return float(options.ewc_weight)
  return bayesian_weight(schedule, index)


def accumulate_fisher(
  earlier: PyTree, last: PyTree, schedule: Any, index: int, estimator: str
) -> PyTree:
  """The Fisher of phase ``index`` from ``earlier`` (the one phase ``index - 1`` used, over phases
  ``< index - 1``) and ``last`` (phase ``index - 1``'s own).

  ``"sampled_tokens"``: the step-weighted mean ``(S earlier + s last) / (S + s)`` with ``S`` the
  steps of phases ``< index - 1`` and ``s`` those of phase ``index - 1``; ``"batch_gradient"``:
  the sum ``earlier + last`` (the behaviour before the per-token Fisher).
  """
  if estimator == "batch_gradient":
    return jax.tree_util.tree_map(jnp.add, earlier, last)
  before = float(sum(p.steps for p in schedule.phases[: index - 1]))
  steps = float(schedule.phases[index - 1].steps)
  return jax.tree_util.tree_map(
    lambda a, b: (before * a + steps * b) / (before + steps), earlier, last
  )


def save_accumulated_fisher(method: Method, setup: PhaseSetup, start_dir: str) -> None:
  """EWC: Fisher of the previous phase (its data, its final params) plus the Fisher accumulated
  over earlier phases, saved to ``start_dir/ewc_fisher``. The batches are the previous phase's
  training batches (seed ``schedule.seed + 7919``), assembled from ``setup.data_shards`` input
  shards like training batches (the same global batches in any process count)."""
  t0 = time.perf_counter()
  schedule, options = setup.schedule, setup.options
  prev_model = lm.LanguageModel(
    method.model_config(setup.base_config, schedule, setup.index - 1, options)
  )
  prev_params = setup.previous_params()
  ds = run_lib.process_dataset(
    method.mixture(schedule, setup.index - 1, options),
    schedule.task_feature_lengths,
    schedule.batch_size,
    run_lib.resolve_data_shards(setup.data_shards, schedule.batch_size),
    seed=schedule.seed + 7919,
    pack=True,
    data_dir=setup.data_dir,
  )
  sharding = setup.partitioner.batch_sharding()
  batches = (
    {k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}
    for b in ds.as_numpy_iterator()
  )
  with setup.partitioner.context():
    fisher = penalties.estimate_fisher(
      prev_model,
      prev_params,
      batches,
      num_batches=options.fisher_batches,
      estimator=options.fisher_estimator,
      rng=jax.random.PRNGKey(schedule.seed + 7919 + setup.index),
    )
  earlier = os.path.join(setup.previous_phase_dir, FISHER_DIR)
  if os.path.isdir(earlier):
    fisher = accumulate_fisher(
      penalties.load_fisher(earlier, float32_like(prev_params)),
      fisher,
      schedule,
      setup.index,
      options.fisher_estimator,
    )
  penalties.save_fisher(os.path.join(start_dir, FISHER_DIR), fisher)
  logging.info(
    "[%s] EWC Fisher (%s) for phase %d estimated on %d batches; weight %g (%.1f s).",
    method.name,
    options.fisher_estimator,
    setup.index,
    options.fisher_batches,
    ewc_weight(schedule, setup.index, options),
    time.perf_counter() - t0,
  )


def load_phase_fisher(phase_dir: str, params: PyTree) -> PyTree:
  """The accumulated Fisher saved in ``phase_dir`` (float32, laid out like ``params``)."""
  return penalties.load_fisher(os.path.join(phase_dir, FISHER_DIR), float32_like(params))
