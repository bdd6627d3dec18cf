"""The environment the tests start CLI subprocesses with (8 fake CPU devices, quiet logs, no GPU,
the shared persistent compilation cache)."""

import os

COMPILE_CACHE = os.path.join("/tmp", "lifelong_moe_jax_test_xla_cache")


def cli_env(data_dir: str | None = None, *, compile_cache: bool = True) -> dict[str, str]:
  """``os.environ`` plus the test settings; ``data_dir`` sets ``LIFELONG_MOE_DATA_DIR``;
  ``compile_cache=False`` leaves JAX's cache to the CLI (e.g. the runner's own setting)."""
  env = dict(os.environ)
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    NO_GCE_CHECK="true",
    TF_CPP_MIN_LOG_LEVEL="2",
    CUDA_VISIBLE_DEVICES="",
  )
  if data_dir is not None:
    env["LIFELONG_MOE_DATA_DIR"] = data_dir
  if compile_cache:
    env.update(
      JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
  else:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env
