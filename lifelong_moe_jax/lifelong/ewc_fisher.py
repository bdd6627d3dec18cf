"""EWC's Fisher diagonal: estimated on the previous phase's training data with its final params when
a phase starts, accumulated over phases and saved with the phase's step-0 checkpoint
(``<phase folder>/ewc_fisher``), so a resumed phase uses the same one."""

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
      prev_model, prev_params, batches, num_batches=options.fisher_batches
    )
  earlier = os.path.join(setup.previous_phase_dir, FISHER_DIR)
  if os.path.isdir(earlier):
    fisher = jax.tree_util.tree_map(
      jnp.add, penalties.load_fisher(earlier, float32_like(prev_params)), fisher
    )
  penalties.save_fisher(os.path.join(start_dir, FISHER_DIR), fisher)
  logging.info(
    "[%s] EWC Fisher for phase %d estimated on %d batches (%.1f s).",
    method.name,
    setup.index,
    options.fisher_batches,
    time.perf_counter() - t0,
  )


def load_phase_fisher(phase_dir: str, params: PyTree) -> PyTree:
  """The accumulated Fisher saved in ``phase_dir`` (float32, laid out like ``params``)."""
  return penalties.load_fisher(os.path.join(phase_dir, FISHER_DIR), float32_like(params))
