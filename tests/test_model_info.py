"""model_info: GLaM-scale counts from abstract evaluation; gin errors are clear and early."""

import os
import subprocess
import sys

import gin

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.model_info import model_info
from lifelong_moe_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(gin_file):
  gin.clear_config()
  gin_utils.parse_gin([gin_file], [])
  try:
    return ModelConfig()
  finally:
    gin.clear_config()


def test_glam_configs_match_the_paper_architecture_without_allocating():
  cfg = _config("models/glam_1.7b_64e.gin")
  info = model_info(cfg, length=1024)  # 27.6B params: would need 110 GB if materialised
  assert (cfg.num_layers, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_experts) == (
    24,
    2048,
    8192,
    16,
    64,
  )
  assert cfg.num_moe_layers == 12
  experts = 12 * 64 * 2 * 2048 * 8192
  assert info.expert_params == experts
  assert 27e9 < info.total_params < 28.5e9
  # A token activates 2 of 64 experts (and an embedding lookup is no matmul): activated params
  # = total - 62/64 of the expert weights - the input embedding.
  assert info.activated_params == info.total_params - experts * 62 // 64 - 256000 * 2048
  small = model_info(_config("models/glam_0.1b_64e.gin"))
  dense = model_info(_config("models/dense_0.1b.gin"))
  assert dense.expert_params == 0 and dense.total_params < small.total_params


def test_demo_dense_counterpart_has_the_same_activated_flops():
  moe = model_info(_config("models/demo.gin"), length=256)
  dense = model_info(_config("models/demo_dense.gin"), length=256)
  assert abs(moe.forward_flops_per_token / dense.forward_flops_per_token - 1) < 0.01


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "lifelong_moe_jax.model_info", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_prints_counts_and_rejects_unknown_bindings():
  ok = _cli("--gin_file=models/glam_0.1b_64e.gin")
  assert ok.returncode == 0, ok.stderr
  assert "total_params" in ok.stdout and "activated_params" in ok.stdout
  bad = _cli("--gin_file=models/tiny.gin", "--gin.ModelConfig.num_expertz=4")
  assert bad.returncode != 0
  assert "num_expertz" in bad.stderr and "Invalid gin configuration" in bad.stderr
  missing = _cli("--gin_file=models/nope.gin")
  assert (
    missing.returncode != 0
    and "models/nope.gin" in missing.stderr
    and "not found" in missing.stderr
  )
  top_k = _cli("--gin_file=models/tiny.gin", "--gin.ModelConfig.top_k=9")
  assert top_k.returncode != 0 and "top_k=9 exceeds num_experts=8" in top_k.stderr
