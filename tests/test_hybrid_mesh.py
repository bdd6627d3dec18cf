"""Hybrid (ICI x DCN) meshes: ``MeshConfig.dcn_*`` and ``partitioning.hybrid_device_array``."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lifelong_moe_jax import partitioning as pt


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """Stands in for a TPU device of a multi-slice job (ids, slice and process indices)."""

  id: int
  slice_index: int | None
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def _devices(slices: int, per_slice: int, with_slice_index: bool = True):
  return [
    FakeDevice(s * per_slice + i, s if with_slice_index else None, s)
    for s in range(slices)
    for i in range(per_slice)
  ]


def test_dcn_data_spans_slices_and_expert_stays_inside():
  config = pt.MeshConfig(data=4, expert=4, model=1, dcn_data=2)
  assert config.is_hybrid and config.ici_shape(16) == (2, 4, 1)
  array = pt.hybrid_device_array(config, _devices(2, 8))
  assert array.shape == (4, 4, 1)
  slices = np.vectorize(lambda d: d.slice_index)(array)
  # Rows 0-1 of the data axis live in slice 0, rows 2-3 in slice 1; every expert group (fixed data
  # index) stays inside one slice, so the all-to-all never crosses DCN.
  np.testing.assert_array_equal(slices[:, :, 0], [[0] * 4, [0] * 4, [1] * 4, [1] * 4])


def test_processes_are_granules_without_slice_index():
  config = pt.MeshConfig(data=2, expert=4, dcn_data=2)
  array = pt.hybrid_device_array(config, _devices(2, 4, with_slice_index=False))
  procs = np.vectorize(lambda d: d.process_index)(array)
  np.testing.assert_array_equal(procs[:, :, 0], [[0] * 4, [1] * 4])


def test_hybrid_mesh_on_real_devices_one_granule():
  mesh = pt.create_mesh(pt.MeshConfig(data=2, expert=4, dcn_data=1, dcn_expert=1))
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  with pytest.raises(
    ValueError,
    match=r"dcn_data=2 x dcn_expert=1 x dcn_model=1 = 2 granules, "
    r"but the 8 devices form 1 processs?",
  ):
    pt.create_mesh(pt.MeshConfig(data=2, expert=4, dcn_data=2))
  assert len(jax.devices()) == 8


@pytest.mark.parametrize(
  "config, devices, message",
  [
    (
      pt.MeshConfig(data=3, expert=4, dcn_data=2),
      12,
      r"Mesh axis 'data' has 3 devices, which cannot span MeshConfig.dcn_data=2 .*3 is not a "
      r"multiple of 2",
    ),
    (
      pt.MeshConfig(data=2, expert=4, dcn_expert=3),
      8,
      r"axis 'expert' has 4 devices.*dcn_expert=3",
    ),
    (pt.MeshConfig(data=4, expert=4, dcn_data=0), 16, r"MeshConfig.dcn_data must be >= 1, got 0"),
    (
      pt.MeshConfig(data=4, expert=4, dcn_data=4),
      16,
      r"dcn_data=4 x dcn_expert=1 x dcn_model=1 = 4 granules, but the 16 devices form 2 slices",
    ),
  ],
)
def test_validation_errors_name_axis_and_numbers(config, devices, message):
  with pytest.raises(ValueError, match=message):
    pt.hybrid_device_array(config, _devices(2, devices // 2))


def test_per_device_memory_matches_the_trainers_shardings():
  """``model_info.per_device_memory`` (abstract shapes, no devices) equals the bytes of the
  largest shard of every leaf of the trainer's sharded abstract state on a data=2 x expert=4 mesh."""
  from lifelong_moe_jax import model_info  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.models import lm  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import optimizers  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import trainer as trainer_lib  # pylint: disable=import-outside-toplevel

  config = ModelConfig(
    vocab_size=256,
    embed_dim=32,
    num_layers=2,
    num_heads=2,
    head_dim=16,
    mlp_dim=256,
    num_experts=8,
    moe_every=2,
    top_k=2,
    max_length=64,
  )
  for name in ("adafactor", "adamw"):
    optimizer = optimizers.create_optimizer(name, lambda step: 1e-3)
    trainer = trainer_lib.Trainer(
      lm.LanguageModel(config), pt.Partitioner(pt.create_mesh(pt.MeshConfig(2, 4, 1))), optimizer
    )

    def nbytes(tree):
      return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for x in jax.tree_util.tree_leaves(tree)
      )

    memory = model_info.per_device_memory(config, {"data": 2, "expert": 4, "model": 1}, name)
    assert memory.params_bytes == nbytes(trainer.abstract_state.params)
    assert memory.optimizer_bytes == nbytes(trainer.abstract_state.opt_state)
