"""The edges contract: the runner trains on the mesh it is given, and gin bindings that a run
would ignore are refused when the config is parsed."""

import dataclasses

import gin
import jax
import pytest

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.lifelong import runner as runner_lib

TWO_PHASES = (
  'LifelongSchedule.phases = ['
  '{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 2}, '
  '{"name": "code_py", "mixture": "lifelong_code_py", "steps": 2, "add_experts": 2}]'
)


@pytest.mark.parametrize(
  "binding",
  [
    "EWCPenalty.weight = 5.0",
    "L2Penalty.weight = 0.5",
    "Distillation.temperature = 2.0",
    "LanguageModel.config = None",
    "LifelongRunner.log_every_steps = 1",
  ],
)
def test_bindings_the_run_would_ignore_are_refused_at_parse_time(binding):
  """Hyperparameters have one home (``MethodOptions``, ``RunnerConfig``, ...): binding the old,
  ignored names is a parse error naming the binding, not a silent no-op."""
  gin.clear_config()
  with pytest.raises(gin_utils.GinConfigError, match=binding.split(".")[0]):
    gin_utils.parse_gin(["lifelong/tiny_test.gin"], ["MODEL_DIR = '/tmp/unused'", binding])
  gin.clear_config()


def test_lifelong_cli_refuses_trainer_bindings(tmp_path):
  """``train`` is registered with gin by the train CLI only: in a lifelong run its bindings would
  be ignored (phases are configured by ``LifelongSchedule``), so the lifelong CLI refuses them."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  model_dir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "lifelong_moe_jax.run_lifelong",
      "--gin_file=lifelong/tiny_test.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.train.batch_size=4",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode != 0
  assert "No configurable matching 'train'" in proc.stderr, proc.stderr[-2000:]
  assert not model_dir.exists()


def test_runner_trains_expands_and_restores_on_the_mesh_it_is_given(tmp_path, prepared_data_dir):
  """``LifelongRunner(mesh_config=X)``: every phase's checkpoints record mesh X and the trained
  params live on X (not on a mesh built from gin's MeshConfig, which here says otherwise)."""
  import tasks  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  gin.clear_config()
  gin_utils.parse_gin(
    ["lifelong/tiny_test.gin"],
    [
      f"MODEL_DIR = '{tmp_path / 'run'}'",
      TWO_PHASES,
      "RunnerConfig.compilation_cache_dir = None",
      "MeshConfig.data = -1",
      "MeshConfig.expert = 1",
    ],
    finalize=False,
  )
  wanted = partitioning.MeshConfig(data=2, expert=2, model=2)
  meshes = []

  def record_mesh(ctx):
    leaf = jax.tree_util.tree_leaves(ctx.params)[0]
    meshes.append(dict(leaf.sharding.mesh.shape))
    return {}

  try:
    runner = runner_lib.LifelongRunner(
      methods=["lifelong_moe"],
      data_dir=prepared_data_dir,
      mesh_config=wanted,
      callbacks={"mesh": record_mesh},
    )
    runner.run()
  finally:
    gin.clear_config()
  expected = {"data": 2, "expert": 2, "model": 2}
  assert meshes == [expected, expected]
  for index in range(2):
    step_dir = runner.final_step_dir("lifelong_moe", index)
    assert checkpoints.read_metadata(step_dir)["mesh"] == expected
  start = checkpoints.resolve_step_dir(runner.phase_dir("lifelong_moe", 1), step=2)
  meta = checkpoints.read_metadata(start)
  assert meta["mesh"] == expected and meta["model_config"]["num_experts"] == 4
  assert dataclasses.asdict(runner.config_for("lifelong_moe", 1))["num_experts"] == 4
