"""Shared pytest set-up.

8 fake CPU devices must be requested before jax is imported anywhere, so this happens at the very top.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402

import pytest  # noqa: E402

# Tests use the library the way the CLIs do: after the task modules registered their tasks.
import tasks  # noqa: E402,F401  pylint: disable=unused-import

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prepared_data_dir() -> str:
  """A data dir with the default distributions, the vocabulary and their TFDS view, prepared once.

  $LIFELONG_MOE_TEST_DATA_DIR if set, else <repo>/data (what `make demo` uses). prepare is idempotent,
  so later sessions only verify the existing build (about a second).
  """
  from lifelong_moe_jax.data import prepare  # pylint: disable=import-outside-toplevel

  root = os.environ.get("LIFELONG_MOE_TEST_DATA_DIR") or str(REPO_ROOT / "data")
  prepare.prepare(data_dir=root)
  return root
