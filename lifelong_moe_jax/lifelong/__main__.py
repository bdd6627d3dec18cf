"""Deprecated alias of ``python -m lifelong_moe_jax.run_lifelong`` (kept for one release)."""

import sys

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import run_lifelong

if __name__ == "__main__":
  print(
    "python -m lifelong_moe_jax.lifelong is deprecated; use python -m "
    "lifelong_moe_jax.run_lifelong.",
    file=sys.stderr,
  )
  gin_utils.run(run_lifelong.main)
