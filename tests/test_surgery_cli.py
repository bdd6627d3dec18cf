"""`python -m lifelong_moe_jax.surgery` on a checkpoint saved from 8 fake devices.

The checkpoint is written by this (8-device) process with the state sharded over a
data=2 x expert=4 mesh; the CLI runs in a single-device process, so every array is resharded on
restore. Running the same command twice is a no-op; expanding the output again under the same phase
name is refused.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax import surgery as surgery_cli
from lifelong_moe_jax.lifelong import phase_expansion
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(
  vocab_size=64,
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_experts=4,
  group_size=32,
  max_length=16,
)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
  """A 2-step-trained tiny MoE state saved from a data=2 x expert=4 mesh of 8 fake devices."""
  assert jax.device_count() == 8
  model_dir = str(tmp_path_factory.mktemp("surgery") / "run")
  mesh = partitioning.create_mesh(partitioning.MeshConfig(data=2, expert=4))
  trainer = trainer_lib.Trainer(
    lm.LanguageModel(CONFIG),
    partitioning.Partitioner(mesh),
    optimizers.create_optimizer(name="adafactor"),
  )
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  for _ in range(2):
    tokens = rng.integers(1, 64, (8, 16)).astype(np.int32)
    state, _ = trainer.train_step(
      state, trainer.global_batch({"decoder_input_tokens": tokens, "decoder_target_tokens": tokens})
    )
  wi = state.params["layers_1"]["moe"]["wi"]
  assert len(wi.sharding.device_set) == 8 and wi.addressable_shards[0].data.shape[0] == 1
  checkpoint_manager.save_state(
    model_dir, 2, state, {"model_config": dataclasses.asdict(CONFIG), "optimizer": "adafactor"}
  )
  return model_dir, jax.device_get(state)


def _single_device_env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _restore(step_dir, config):
  """The saved train state, restored onto this process's 8 devices."""
  trainer = trainer_lib.Trainer(
    lm.LanguageModel(config),
    partitioning.Partitioner(partitioning.create_mesh(partitioning.MeshConfig())),
    optimizers.create_optimizer(name="adafactor"),
  )
  return jax.device_get(checkpoints.restore_tree(step_dir, trainer.abstract_state))


def test_cli_expands_and_a_rerun_is_a_no_op(saved_checkpoint, tmp_path):
  model_dir, before = saved_checkpoint
  output = str(tmp_path / "expanded")
  cmd = [
    sys.executable,
    "-m",
    "lifelong_moe_jax.surgery",
    f"--checkpoint={model_dir}",
    f"--output={output}",
    "--add_experts=4",
    "--init=copy",
    "--noise_scale=0.01",
  ]
  first = subprocess.run(
    cmd, cwd=REPO, env=_single_device_env(), capture_output=True, text=True, timeout=300
  )
  assert first.returncode == 0, first.stderr[-3000:]
  assert "Expanded 4 -> 8 experts" in first.stdout

  step_dir = checkpoints.resolve_step_dir(output)
  meta = checkpoints.read_metadata(step_dir)
  assert meta["model_config"]["num_experts"] == 8 and "data" not in meta
  record = PhaseRecord.from_dict(meta["lifelong"]["phase_record"])
  assert record.expert_slices() == {"pretrain": (0, 4), "expand_at_step_2": (4, 8)}

  after = _restore(step_dir, dataclasses.replace(CONFIG, num_experts=8))
  axes = lm.LanguageModel(CONFIG).params_logical_axes()
  phase_expansion.validate_expansion(before.params, after.params, axes, 4)  # old slices bit-equal
  wi_nu = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(after.opt_state)[0]
    if "wi" in jax.tree_util.keystr(path) and np.ndim(leaf) == 3
  ]
  assert wi_nu and all(leaf.shape[0] == 8 for leaf in wi_nu)

  # The same command again finds the finished output and does nothing (in-process: same code path).
  stamp = os.path.getmtime(os.path.join(step_dir, "state"))
  outcome = surgery_cli.run_surgery(model_dir, output, 4, init="copy", noise_scale=0.01)
  assert outcome.status == "already_done" and outcome.num_experts_after == 8
  assert os.path.getmtime(os.path.join(step_dir, "state")) == stamp


def test_expanding_the_output_again_is_refused(saved_checkpoint, tmp_path):
  model_dir, _ = saved_checkpoint
  first = surgery_cli.run_surgery(model_dir, str(tmp_path / "once"), 4, init="random")
  assert first.status == "expanded" and first.num_experts_after == 8
  with pytest.raises(phase_expansion.AlreadyExpandedError, match="already expanded"):
    surgery_cli.run_surgery(str(tmp_path / "once"), str(tmp_path / "twice"), 4)
  assert not os.path.exists(tmp_path / "twice")
  with pytest.raises(surgery_cli.SurgeryCliError, match="different checkpoint"):
    surgery_cli.run_surgery(model_dir, str(tmp_path / "once"), 4, phase_name="other")
