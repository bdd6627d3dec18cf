"""Deprecated alias of ``python -m lifelong_moe_jax.evaluate`` (kept for one release)."""

import sys

from lifelong_moe_jax import evaluate
from lifelong_moe_jax import gin_utils

if __name__ == "__main__":
  print(
    "python -m lifelong_moe_jax.eval is deprecated; use python -m lifelong_moe_jax.evaluate.",
    file=sys.stderr,
  )
  gin_utils.run(evaluate.main)
