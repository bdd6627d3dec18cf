"""gin_utils: t5x-style flags, required macros, clear errors, operative config."""
import gin
import pytest

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import train  # noqa: F401  registers the run configurables


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_rewrite_gin_args():
  out = gin_utils.rewrite_gin_args(["prog", "--gin.TRAIN_STEPS=5", '--gin.MODEL_DIR="/a b"',
                                    "--gin_file=x.gin"])
  assert out == ["prog", "--gin_bindings=TRAIN_STEPS = 5", '--gin_bindings=MODEL_DIR = "/a b"',
                 "--gin_file=x.gin"]
  with pytest.raises(gin_utils.GinConfigError, match="has no value"):
    gin_utils.rewrite_gin_args(["--gin.TRAIN_STEPS"])


def test_missing_required_macros_are_listed_together():
  with pytest.raises(gin_utils.GinConfigError) as err:
    gin_utils.parse_gin(["models/tiny.gin", "runs/pretrain.gin"],
                        ['MODEL_DIR = "/tmp/x"', "TRAIN_STEPS = 3"])
  assert "Missing required gin macro(s): BATCH_SIZE, MIXTURE_OR_TASK_NAME, " \
         "TASK_FEATURE_LENGTHS." in str(err.value)


def test_complete_config_parses_and_later_bindings_win():
  gin_utils.parse_gin(["models/tiny.gin", "runs/pretrain.gin"],
                      ['MODEL_DIR = "/tmp/x"', "TRAIN_STEPS = 3", "BATCH_SIZE = 8",
                       'MIXTURE_OR_TASK_NAME = "lifelong_all"',
                       "TASK_FEATURE_LENGTHS = {'targets': 32}", "MeshConfig.expert = 4"])
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
  assert importlib.util.find_spec("runs").origin is None   # the condition that broke gin
  gin_utils.parse_gin(["runs/pretrain.gin", "lifelong/tiny_test.gin"],
                      ['MODEL_DIR = "/tmp/x"', "TRAIN_STEPS = 3", "BATCH_SIZE = 8",
                       'MIXTURE_OR_TASK_NAME = "lifelong_all"',
                       "TASK_FEATURE_LENGTHS = {'targets': 32}"], finalize=False)
  assert gin.query_parameter("ModelConfig.embed_dim") == 32   # from the include models/tiny.gin
  assert gin_utils.resolve_gin_file("runs/pretrain.gin").endswith("/gin/runs/pretrain.gin")
