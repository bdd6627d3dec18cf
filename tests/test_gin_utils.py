"""gin_utils: t5x-style flags, required macros, clear errors, operative config, task modules."""

import sys

import gin
import pytest

from lifelong_moe_jax import cli_errors
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import train

train.configurable_train()  # the train CLI registers its entry point with gin the same way


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_rewrite_gin_args():
  out = gin_utils.rewrite_gin_args(
    ["prog", "--gin.TRAIN_STEPS=5", '--gin.MODEL_DIR="/a b"', "--gin_file=x.gin"]
  )
  assert out == [
    "prog",
    "--gin_bindings=TRAIN_STEPS = 5",
    '--gin_bindings=MODEL_DIR = "/a b"',
    "--gin_file=x.gin",
  ]
  with pytest.raises(gin_utils.GinConfigError, match="has no value"):
    gin_utils.rewrite_gin_args(["--gin.TRAIN_STEPS"])


def test_missing_required_macros_are_listed_together():
  with pytest.raises(gin_utils.GinConfigError) as err:
    gin_utils.parse_gin(
      ["models/tiny.gin", "runs/pretrain.gin"], ['MODEL_DIR = "/tmp/x"', "TRAIN_STEPS = 3"]
    )
  assert (
    "Missing required gin macro(s): BATCH_SIZE, MIXTURE_OR_TASK_NAME, "
    "TASK_FEATURE_LENGTHS." in str(err.value)
  )


def test_complete_config_parses_and_later_bindings_win():
  gin_utils.parse_gin(
    ["models/tiny.gin", "runs/pretrain.gin"],
    [
      'MODEL_DIR = "/tmp/x"',
      "TRAIN_STEPS = 3",
      "BATCH_SIZE = 8",
      'MIXTURE_OR_TASK_NAME = "lifelong_all"',
      "TASK_FEATURE_LENGTHS = {'targets': 32}",
      "MeshConfig.expert = 4",
    ],
  )
  assert gin_utils.missing_required_macros() == []
  assert gin.query_parameter("MeshConfig.expert") == 4
  assert gin.query_parameter("create_optimizer.name") == "adafactor"


def test_unknown_binding_and_missing_file_are_clear_errors():
  with pytest.raises(gin_utils.GinConfigError, match="no_such_setting"):
    gin_utils.parse_gin(["models/tiny.gin"], ["train.no_such_setting = 1"])
  with pytest.raises(gin_utils.GinConfigError, match="not found"):
    gin_utils.parse_gin(["models/does_not_exist.gin"], [])


def test_operative_config_is_written(tmp_path):
  gin_utils.parse_gin(["models/tiny.gin"], [])
  from lifelong_moe_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel

  ModelConfig()
  path = gin_utils.write_operative_config(str(tmp_path / "run"))
  assert "ModelConfig.num_experts = 8" in open(path).read()


def test_distributed_flags_must_come_together():
  assert gin_utils.initialize_distributed(None, None, None) is False
  with pytest.raises(gin_utils.GinConfigError, match="coordinator_address"):
    gin_utils.initialize_distributed(None, 2, 1)
  with pytest.raises(gin_utils.GinConfigError, match="process_count"):
    gin_utils.initialize_distributed("localhost:1234", None, 0)


def test_folders_named_like_gin_subfolders_in_the_working_directory(tmp_path, monkeypatch):
  """After `make demo` the working directory holds ./runs and ./data: plain folders that Python
  sees as namespace packages, which gin's package-resource reader used to crash on."""
  import importlib  # pylint: disable=import-outside-toplevel

  for name in ("runs", "models", "data"):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  assert importlib.util.find_spec("runs").origin is None  # the condition that broke gin
  gin_utils.parse_gin(
    ["runs/pretrain.gin", "lifelong/tiny_test.gin"],
    [
      'MODEL_DIR = "/tmp/x"',
      "TRAIN_STEPS = 3",
      "BATCH_SIZE = 8",
      'MIXTURE_OR_TASK_NAME = "lifelong_all"',
      "TASK_FEATURE_LENGTHS = {'targets': 32}",
    ],
    finalize=False,
  )
  assert gin.query_parameter("ModelConfig.embed_dim") == 32  # from the include models/tiny.gin
  assert gin_utils.resolve_gin_file("runs/pretrain.gin").endswith("/gin/runs/pretrain.gin")


def test_import_task_modules_names_a_missing_module():
  with pytest.raises(cli_errors.TaskModuleError) as err:
    gin_utils.import_task_modules(["no_such_tasks_pkg.sub"])
  message = str(err.value)
  assert "'no_such_tasks_pkg.sub' (--tasks_module)" in message and "PYTHONPATH" in message
  assert "\n" not in message


def test_import_task_modules_registers_the_tasks_of_a_user_module(tmp_path, monkeypatch):
  import importlib  # pylint: disable=import-outside-toplevel
  import seqio  # pylint: disable=import-outside-toplevel

  (tmp_path / "my_test_tasks_mod.py").write_text(
    "import seqio\n"
    "from lifelong_moe_jax.data import registration\n"
    "registration.add_text_task('my_test_task', seqio.FunctionDataSource(\n"
    "    lambda split, shuffle_files, seed=None: None, splits=['train']))\n"
  )
  (tmp_path / "broken_test_tasks_mod.py").write_text("import no_such_dependency_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  try:
    assert gin_utils.import_task_modules(["tasks,my_test_tasks_mod"]) == [
      "tasks",
      "my_test_tasks_mod",
    ]
    assert "my_test_task" in seqio.TaskRegistry.names()
    assert "lifelong_all" in seqio.MixtureRegistry.names()
    # A module that exists but fails on its own import: the original error, not a flag hint.
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
      gin_utils.import_task_modules(["broken_test_tasks_mod"])
  finally:
    seqio.TaskRegistry.remove("my_test_task")
    sys.modules.pop("my_test_tasks_mod", None)
    sys.modules.pop("broken_test_tasks_mod", None)


def test_tasks_module_flag_defaults_to_the_tasks_package():
  from absl import flags  # pylint: disable=import-outside-toplevel

  assert flags.FLAGS["tasks_module"].default == ["tasks"]


def test_gin_errors_are_one_line_with_the_binding_and_the_fix():
  with pytest.raises(gin_utils.GinConfigError) as err:
    gin_utils.parse_gin(["models/tiny.gin"], ["ModelConfig.num_experst = 4"])
  assert "\n" not in str(err.value)
  assert (
    "Configurable 'ModelConfig' doesn't have a parameter named 'num_experst' (in bindings "
    "string line 1: ModelConfig.num_experst = 4). Check the spelling"
  ) in str(err.value)
  gin.clear_config()
  with pytest.raises(
    gin_utils.GinConfigError,
    match=r"Gin macro %BATCH is used but never bound; "
    r"set it with --gin\.BATCH=VALUE",
  ):
    gin_utils.parse_gin(["models/tiny.gin"], ["ModelConfig.num_experts = %BATCH"])
  gin.clear_config()
  with pytest.raises(
    gin_utils.GinConfigError,
    match=r"a value is not closed \(EOF in multi-line "
    r"statement\); check brackets and quotes",
  ):
    gin_utils.parse_gin(["models/tiny.gin"], ["ModelConfig.num_experts = [1"])


def test_one_line_and_exit_codes():
  from lifelong_moe_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel

  assert (
    cli_errors.one_line(
      "Unknown task 'x'.\nRegistered tasks: a, b\n  In call to configurable "
      "'train' (<function train>)\nSee docs."
    )
    == "Unknown task 'x'. Registered tasks: a, b; See docs."
  )
  with pytest.raises(ValueError) as project:  # raised by the package: a usage error
    ModelConfig(num_experts=8, top_k=9)
  assert cli_errors.exit_code_for(project.value) == cli_errors.USAGE_EXIT_CODE
  assert cli_errors.exit_code_for(gin_utils.GinConfigError("bad")) == cli_errors.USAGE_EXIT_CODE
  assert cli_errors.exit_code_for(cli_errors.TaskModuleError("none")) == cli_errors.USAGE_EXIT_CODE
  with pytest.raises(ValueError) as foreign:  # raised elsewhere: keeps its traceback
    int("x")
  assert cli_errors.exit_code_for(foreign.value) is None
  assert cli_errors.exit_code_for(KeyError("bug")) is None
