"""A lifelong runner on ``gin/lifelong/tiny_test.gin`` for in-process tests."""

import gin

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import runner as runner_lib

# Two short phases: wiki_en (4 steps), then code_py (3 steps, 2 experts added), one eval batch.
TWO_PHASES = (
  'LifelongSchedule.phases = [{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 4},'
  ' {"name": "code_py", "mixture": "lifelong_code_py", "steps": 3, "add_experts": 2}]',
  "LifelongSchedule.eval_max_batches = 1",
)


def tiny_runner(model_dir, data_dir, methods, bindings=()):
  """``LifelongRunner(methods)`` on tiny_test.gin with ``MODEL_DIR`` and extra gin ``bindings``
  (the gin config is cleared before and after)."""
  gin.clear_config()
  gin_utils.parse_gin(
    ["lifelong/tiny_test.gin"], [f"MODEL_DIR = '{model_dir}'", *bindings], finalize=False
  )
  try:
    return runner_lib.LifelongRunner(methods=methods, data_dir=data_dir)
  finally:
    gin.clear_config()
