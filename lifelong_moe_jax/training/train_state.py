"""The train state: everything a step needs and a checkpoint stores, as one pytree.

``TrainState(step, params, opt_state, rng)``:

* ``step``: int32 ``[]``, completed optimizer updates;
* ``params``: unboxed params (arrays sharded by their logical axes);
* ``opt_state``: the optax state (sharded like the params it tracks, see
  ``partitioning.state_logical_axes``);
* ``rng``: uint32 ``[2]`` base PRNG key. The key of step ``s`` is ``fold_in(rng, s)``, so a run
  resumed from a checkpoint draws exactly the random numbers an uninterrupted run draws.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax import partitioning

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Step counter, params, optimizer state and base rng (see the module docstring)."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array

  def step_rng(self) -> jax.Array:
    """The PRNG key of the step about to run: ``fold_in(rng, step)``."""
    return jax.random.fold_in(self.rng, self.step)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """``(params_init_key, train_key)`` derived from the run's seed."""
  params_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  return params_key, train_key


def create(
  params: PyTree,
  tx: optax.GradientTransformation,
  seed: int,
  opt_state: PyTree | None = None,
  step: int = 0,
) -> TrainState:
  """A train state from (unboxed) params; ``opt_state`` defaults to ``tx.init(params)``.

  Traceable: call it under ``jax.jit`` with out-shardings to build the state sharded.
  """
  return TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    opt_state=tx.init(params) if opt_state is None else opt_state,
    rng=seed_keys(seed)[1],
  )


def logical_axes(abstract_state: TrainState, params_axes: PyTree) -> TrainState:
  """A ``TrainState`` of logical ``PartitionSpec``: params keep their axes, optimizer leaves
  inherit them (``partitioning.state_logical_axes``), step and rng are replicated."""
  return TrainState(
    step=P(),
    params=params_axes,
    opt_state=partitioning.state_logical_axes(
      abstract_state.opt_state, abstract_state.params, params_axes
    ),
    rng=P(),
  )


def abstract(state_shapes: TrainState, shardings: TrainState) -> TrainState:
  """``ShapeDtypeStruct`` leaves carrying their sharding (the target of a sharded restore)."""
  return jax.tree_util.tree_map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
  )


def param_count(params: PyTree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
