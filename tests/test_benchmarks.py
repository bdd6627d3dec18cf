"""The README's benchmark commands run end to end (tiny settings; the numbers are not checked here,
benchmarks print ratios measured in one run, see benchmarks/)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, data_dir, *args):
  env = dict(os.environ, LIFELONG_MOE_DATA_DIR=data_dir, NO_GCE_CHECK="true",
             TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  env.pop("XLA_FLAGS", None)   # train_step.py asks for 8 host devices itself
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stdout


def test_moe_vs_dense_prints_a_ratio(prepared_data_dir):
  out = _run("moe_vs_dense.py", prepared_data_dir, "--moe_gin=models/tiny.gin",
             "--dense_gin=models/tiny_dense.gin", "--vocab_size=256", "--batch=8", "--length=64",
             "--steps=2", "--rounds=1")
  ratio = re.search(r"ratio moe/dense = ([0-9.]+)", out)
  assert ratio and float(ratio.group(1)) > 0, out


def test_train_step_prints_mesh_ratios(prepared_data_dir):
  out = _run("train_step.py", prepared_data_dir, "--gin_file=models/tiny.gin", "--batch=8",
             "--length=64", "--steps=2", "--rounds=1")
  assert re.search(r"ratio 8 / 1 device: tokens/s x[0-9.]+", out), out
  assert re.search(r"outside-jit fraction \(worst mesh\): [0-9.]+%", out), out
