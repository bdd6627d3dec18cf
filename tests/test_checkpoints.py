"""Checkpoint glue: sharded round trip, data position, metadata, mismatch errors (in-process)."""

import dataclasses
import os

from clu.data import TfDatasetIterator
import jax
import numpy as np
import pytest
import tensorflow as tf

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import trainer as trainer_lib

CFG = ModelConfig(
  vocab_size=64,
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_experts=8,
  group_size=32,
  max_length=64,
)


def _trainer(config=CFG):
  opt = optimizers.create_optimizer(
    "adafactor", optimizers.learning_rate_schedule("constant", 1e-3, warmup_steps=0)
  )
  return trainer_lib.Trainer(
    lm.LanguageModel(config), pt.Partitioner(pt.create_mesh(pt.MeshConfig(2, 4, 1))), opt, seed=5
  )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A run folder with checkpoints at steps 3 and 7 (state + data position + metadata)."""
  model_dir = str(tmp_path_factory.mktemp("ckpt_run"))
  trainer = _trainer()
  state = trainer.init_state()
  ds = tf.data.Dataset.range(1000).shuffle(50, seed=0).map(lambda x: {"x": x}).batch(4)
  it = TfDatasetIterator(ds, checkpoint=True)
  for _ in range(3):
    next(it)
  ckpt = checkpoint_manager.Checkpointer(
    model_dir, checkpoints.CheckpointConfig(save_interval_steps=1)
  )
  ckpt.save(
    3,
    state,
    {
      "vocabulary_fingerprint": "byte:extra_ids=0",
      "model_config": dataclasses.asdict(CFG),
      "phase_record": {"phase": 1},
    },
    data_iterator=it,
  )
  expected_next = [next(it)["x"] for _ in range(3)]
  ckpt.save(7, state, {"vocabulary_fingerprint": "byte:extra_ids=0"})
  ckpt.close()
  return model_dir, trainer, jax.device_get(state), ds, expected_next


def test_sharded_round_trip_and_metadata(saved):
  model_dir, trainer, state, _, _ = saved
  assert checkpoint_manager.Checkpointer(model_dir).all_steps() == [3, 7]
  step_dir = checkpoints.resolve_step_dir(model_dir, step=3)
  assert checkpoints.read_metadata(step_dir)["phase_record"] == {"phase": 1}
  assert checkpoints.read_metadata(model_dir)["step"] == 7  # latest
  assert checkpoints.read_metadata(os.path.join(model_dir, "checkpoints"))["step"] == 7
  restored = checkpoints.restore_tree(step_dir, trainer.abstract_state)
  wi = restored.params["layers_1"]["moe"]["wi"]
  assert wi.sharding == trainer.state_shardings.params["layers_1"]["moe"]["wi"]
  assert {s.data.shape for s in wi.addressable_shards} == {(2, 32, 64)}  # never gathered
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored), state)
  params = checkpoints.restore_params(step_dir, trainer.abstract_state.params)
  np.testing.assert_array_equal(
    jax.device_get(params["layers_1"]["moe"]["wi"]), state.params["layers_1"]["moe"]["wi"]
  )


def test_data_position_round_trip(saved):
  model_dir, _, _, ds, expected_next = saved
  it = TfDatasetIterator(ds, checkpoint=True)
  assert checkpoints.restore_data_iterator(checkpoints.resolve_step_dir(model_dir, 3), it)
  assert [next(it)["x"].tolist() for _ in range(3)] == [x.tolist() for x in expected_next]
  assert not checkpoints.restore_data_iterator(checkpoints.resolve_step_dir(model_dir, 7), it)


def test_mismatch_names_params_and_config_difference(saved):
  model_dir, _, _, _, _ = saved
  other = _trainer(dataclasses.replace(CFG, num_experts=4))
  step_dir = checkpoints.resolve_step_dir(model_dir, step=3)
  with pytest.raises(checkpoints.CheckpointMismatchError) as err:
    checkpoints.restore_tree(step_dir, other.abstract_state)
  message = str(err.value)
  listed = [line.strip() for line in message.splitlines()[1:] if line.startswith("  ")]
  assert (
    listed[0] == "params/layers_1/moe/router/kernel: checkpoint shape (32, 8) vs model shape "
    "(32, 4)"
  ), message
  assert (
    "params/layers_1/moe/wi: checkpoint shape (8, 32, 64) vs model shape (4, 32, 64)" in message
  )
  assert any(line.startswith("opt_state/") for line in listed), message
  assert "num_experts: checkpoint 8 vs current 4" not in message  # only with model_config given
  with pytest.raises(
    checkpoints.CheckpointMismatchError, match="num_experts: checkpoint 8 vs current 4"
  ):
    checkpoints.restore_params(
      step_dir, other.abstract_state.params, model_config=dataclasses.asdict(other.model.config)
    )
  # The trainer resumes from its own folder the same way: an error, never a re-initialisation.
  with pytest.raises(checkpoints.CheckpointMismatchError, match="params/"):
    other.restore_or_initialize(checkpoint_manager.Checkpointer(model_dir))


def test_vocabulary_fingerprint_mismatch(saved):
  model_dir, trainer, _, _, _ = saved
  with pytest.raises(ValueError, match="Vocabulary mismatch"):
    trainer.restore_or_initialize(
      checkpoint_manager.Checkpointer(model_dir),
      vocabulary_fingerprint="sentencepiece:sha256=abc:extra_ids=0",
    )
  start = trainer.restore_or_initialize(
    checkpoint_manager.Checkpointer(model_dir), vocabulary_fingerprint="byte:extra_ids=0"
  )
  assert start.source == "resumed" and start.step_dir.endswith("7")


def test_restore_modes_from_explicit_path(saved):
  model_dir, trainer, state, _, _ = saved
  full = trainer.restore_or_initialize(None, restore_checkpoint_path=model_dir, restore_mode="full")
  assert full.source == "restored-full"
  params_only = trainer.restore_or_initialize(None, restore_checkpoint_path=model_dir)
  assert params_only.source == "restored-params" and int(params_only.state.step) == 0
  np.testing.assert_array_equal(
    jax.device_get(params_only.state.params["layers_0"]["mlp"]["wi"]),
    state.params["layers_0"]["mlp"]["wi"],
  )
  with pytest.raises(ValueError, match="restore_mode"):
    trainer.restore_or_initialize(None, restore_checkpoint_path=model_dir, restore_mode="some")


def test_missing_checkpoints_are_clear_errors(tmp_path):
  with pytest.raises(checkpoints.CheckpointNotFoundError, match="does not exist"):
    checkpoints.resolve_step_dir(str(tmp_path / "nope"))
  with pytest.raises(checkpoints.CheckpointNotFoundError, match="No complete checkpoint"):
    checkpoints.resolve_step_dir(str(tmp_path))
  with pytest.raises(ValueError, match="save_interval_steps"):
    checkpoints.CheckpointConfig(save_interval_steps=0)


def test_relative_model_dir_saves_and_restores(tmp_path, monkeypatch):
  """`make demo` passes ./runs/demo: orbax refuses relative paths, so they are made absolute."""
  monkeypatch.chdir(tmp_path)
  trainer = _trainer()
  state = trainer.init_state()
  ckpt = checkpoint_manager.Checkpointer(
    os.path.join(".", "runs", "rel"), checkpoints.CheckpointConfig(save_interval_steps=1)
  )
  ckpt.save(2, state, {"vocabulary_fingerprint": "byte:extra_ids=0"})
  ckpt.close()
  assert os.path.isdir(tmp_path / "runs" / "rel" / "checkpoints" / "2")
  step_dir = checkpoints.resolve_step_dir("runs/rel")
  assert os.path.isabs(step_dir)
  restored = checkpoints.restore_params("runs/rel/checkpoints/2", trainer.abstract_state.params)
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state.params)
  )
