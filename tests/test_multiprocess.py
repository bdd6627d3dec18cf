"""Multi-process runs through ``launch/local.py`` (2 processes x 4 fake CPU devices = 8 devices).

Runs (module fixtures, tiny MoE, mesh data=2 x expert=4 so the data axis crosses the processes,
global batch 8 assembled from ``data_shards=2`` input shards):

* ``one``: 1 process x 8 devices, 8 steps (``--gin.train.data_shards=2``: the same global batches);
* ``two``: 2 processes x 4 devices, 8 steps, checkpoints at 4 and 8;
* ``killed``: 2 processes, a run to 1000 steps checkpointing only at step 4, both processes
  SIGKILLed once that checkpoint is complete, relaunched with TRAIN_STEPS=8;
* ``lifelong_runs``: the lifelong runner on ``gin/lifelong/tiny_test.gin`` (lifelong_moe and
  finetune: expansion, freezing, distillation) in 1 process x 8 devices and in 2 processes x 4
  devices, both with ``RunnerConfig.data_shards=2``, every file write under MODEL_DIR recorded
  by ``tests/write_audit/sitecustomize.py``.

Subprocesses share the persistent XLA compilation cache of tests/test_trainer_cli.py.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import param_tree
from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import summaries
from lifelong_moe_jax.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local.py")
COMPILE_CACHE = os.path.join("/tmp", "lifelong_moe_jax_test_xla_cache")
STEPS = 8
TRAIN_ARGS = [
  "--gin_file=models/tiny.gin",
  "--gin_file=runs/pretrain.gin",
  '--gin.MIXTURE_OR_TASK_NAME="lifelong_all"',
  "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
  "--gin.BATCH_SIZE=8",
  "--gin.MeshConfig.data=2",
  "--gin.MeshConfig.expert=4",
  "--gin.train.data_shards=2",
  "--gin.train.summary_every_steps=1",
  "--gin.train.log_every_steps=4",
  "--gin.train.eval_every_steps=0",
  "--gin.learning_rate_schedule.warmup_steps=10",
]
TIMEOUT_S = 900


def _env(data_dir: str, devices: int = 8) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    NO_GCE_CHECK="true",
    TF_CPP_MIN_LOG_LEVEL="2",
    CUDA_VISIBLE_DEVICES="",
    JAX_PLATFORMS="cpu",
    LIFELONG_MOE_DATA_DIR=data_dir,
    JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return env


def _train_args(model_dir: str, steps: int, *extra: str) -> list[str]:
  return [*TRAIN_ARGS, f'--gin.MODEL_DIR="{model_dir}"', f"--gin.TRAIN_STEPS={steps}", *extra]


def _launch_cmd(module: str, args, num_processes: int = 2, devices: int | str = 4) -> list[str]:
  return [
    sys.executable,
    LAUNCHER,
    f"--num_processes={num_processes}",
    f"--devices_per_process={devices}",
    "--",
    module,
    *args,
  ]


def run_launched(
  data_dir: str, module: str, args, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
  """Runs ``module`` in 2 processes x 4 devices through the launcher."""
  return subprocess.run(
    _launch_cmd(module, args, **kw),
    cwd=REPO,
    env=env or _env(data_dir),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def run_single(
  data_dir: str, module: str, args, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
  """Runs ``python -m lifelong_moe_jax.<module>`` in 1 process x 8 devices."""
  return subprocess.run(
    [sys.executable, "-m", f"lifelong_moe_jax.{module}", *args],
    cwd=REPO,
    env=env or _env(data_dir),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def _ok(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
  return proc.stderr


def _records(model_dir: str) -> list[dict]:
  return summaries.read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))


def _restore_state(model_dir: str, step: int):
  step_dir = checkpoints.resolve_step_dir(model_dir, step=step)
  config = ModelConfig(**checkpoints.read_metadata(step_dir)["model_config"])
  trainer = trainer_lib.Trainer(
    lm.LanguageModel(config),
    pt.Partitioner(pt.create_mesh(pt.MeshConfig(2, 4, 1))),
    optimizers.create_optimizer("adafactor", optimizers.learning_rate_schedule()),
  )
  return jax.device_get(checkpoints.restore_tree(step_dir, trainer.abstract_state))


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def one(prepared_data_dir, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("one") / "run")
  proc, wall = _timed(
    lambda: run_single(
      prepared_data_dir,
      "train",
      _train_args(model_dir, STEPS, "--gin.CheckpointConfig.save_interval_steps=4"),
    )
  )
  return model_dir, _ok(proc), wall


@pytest.fixture(scope="module")
def two(prepared_data_dir, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("two") / "run")
  proc, wall = _timed(
    lambda: run_launched(
      prepared_data_dir,
      "train",
      _train_args(model_dir, STEPS, "--gin.CheckpointConfig.save_interval_steps=4"),
    )
  )
  return model_dir, _ok(proc), wall


@pytest.fixture(scope="module")
def killed(prepared_data_dir, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("killed") / "run")
  marker = os.path.join(model_dir, "checkpoints", "4", "_CHECKPOINT_METADATA")
  err_path = os.path.join(os.path.dirname(model_dir), "launcher.err")
  with open(err_path, "w") as err:
    launcher = subprocess.Popen(
      _launch_cmd(
        "train",
        _train_args(
          model_dir,
          1000,
          "--gin.CheckpointConfig.save_interval_steps=1000",
          "--gin.CheckpointConfig.extra_save_steps=[4]",
        ),
      ),
      cwd=REPO,
      env=_env(prepared_data_dir),
      stdout=subprocess.DEVNULL,
      stderr=err,
    )
    deadline = time.time() + TIMEOUT_S
    while not os.path.exists(marker):
      assert launcher.poll() is None, open(err_path).read()[-5000:]
      assert time.time() < deadline, "step-4 checkpoint never appeared"
      time.sleep(0.2)
    with open(err_path) as f:
      pids = [int(p) for p in re.findall(r"\[launch\] process \d pid (\d+)", f.read())]
    assert len(pids) == 2
    for pid in pids:
      os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=120)
  killed_code = launcher.returncode
  killed_at = max(r["step"] for r in _records(model_dir))
  log = _ok(
    run_launched(
      prepared_data_dir,
      "train",
      _train_args(model_dir, STEPS, "--gin.CheckpointConfig.save_interval_steps=4"),
    )
  )
  return model_dir, killed_code, killed_at, log


def test_two_processes_equal_one_process(one, two):
  """Per-step losses and final params of 2 x 4 devices equal 1 x 8 devices within 1e-5."""
  one_dir, _, wall_one = one
  two_dir, log_two, wall_two = two
  a, b = _records(one_dir), _records(two_dir)
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)
  assert "[0] " in log_two and "[1] " in log_two  # output prefixed with the process index
  state_a, state_b = _restore_state(one_dir, STEPS), _restore_state(two_dir, STEPS)
  flat_a = jax.tree_util.tree_flatten_with_path(state_a.params)[0]
  flat_b = jax.tree_util.tree_leaves(state_b.params)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-5, err_msg=param_tree.path_str(path))
  meta = checkpoints.read_metadata(two_dir)
  assert meta["process_count"] == 2 and meta["data"]["data_shards"] == 2
  times = {
    name: float(np.median([r["step_time"] for r in recs[2:]]))
    for name, recs in (("1x8", a), ("2x4", b))
  }
  with open(os.path.join("/tmp", "lifelong_moe_multiprocess_timing.json"), "w") as f:
    json.dump({"median_step_time_s": times, "wall_s": {"1x8": wall_one, "2x4": wall_two}}, f)
  print(f"median step time {times}; wall {wall_one:.0f} s (1x8) vs {wall_two:.0f} s (2x4)")


def test_sigkill_both_processes_and_relaunch_is_bit_identical(two, killed):
  two_dir = two[0]
  model_dir, killed_code, killed_at, log = killed
  assert killed_code != 0 and killed_at >= 4
  assert "Start state: resumed at step 4" in log
  assert [r["step"] for r in _records(model_dir)] == list(range(1, STEPS + 1))
  state_a, state_b = _restore_state(two_dir, STEPS), _restore_state(model_dir, STEPS)
  flat_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  flat_b = jax.tree_util.tree_leaves(state_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(y, x, err_msg=param_tree.path_str(path))


def test_surgery_cli_on_a_two_process_checkpoint_in_two_processes(two, prepared_data_dir, tmp_path):
  """Expanding the 2-process run's checkpoint (8 -> 12 experts) in 2 processes gives the same
  arrays (params and optimizer state) as in 1 process."""
  source = two[0]
  out2, out1 = str(tmp_path / "surgery2"), str(tmp_path / "surgery1")
  args = [f"--checkpoint={source}", "--add_experts=4", "--seed=3"]
  _ok(run_launched(prepared_data_dir, "surgery", args + [f"--output={out2}"]))
  _ok(run_single(prepared_data_dir, "surgery", args + [f"--output={out1}"]))
  meta = checkpoints.read_metadata(checkpoints.resolve_step_dir(out2, step=STEPS))
  assert meta["model_config"]["num_experts"] == 12
  state_2, state_1 = _restore_state(out2, STEPS), _restore_state(out1, STEPS)
  flat_1 = jax.tree_util.tree_flatten_with_path(state_1)[0]
  flat_2 = jax.tree_util.tree_leaves(state_2)
  assert len(flat_1) == len(flat_2)
  for (path, x), y in zip(flat_1, flat_2):
    np.testing.assert_array_equal(y, x, err_msg=param_tree.path_str(path))


def test_infer_score_and_fewshot_in_two_processes_equal_one_process(
  two, prepared_data_dir, tmp_path
):
  """``infer`` in score mode and few-shot eval write byte-identical files in 2 and 1 processes."""
  checkpoint = two[0]
  mesh = ["--gin.MeshConfig.data=2", "--gin.MeshConfig.expert=4"]
  runs = {
    "infer": [
      "--gin_file=runs/infer.gin",
      f'--gin.CHECKPOINT_PATH="{checkpoint}"',
      '--gin.MIXTURE_OR_TASK_NAME="lifelong_wiki_en"',
      '--gin.INFER_MODE="score"',
      "--gin.infer.max_examples=8",
      *mesh,
    ],
    "evaluate": [
      "--gin_file=runs/fewshot.gin",
      f'--gin.CHECKPOINT_PATH="{checkpoint}"',
      "--gin.MAX_EXAMPLES=8",
      *mesh,
    ],
  }
  for module, args in runs.items():
    out2, out1 = tmp_path / f"{module}2", tmp_path / f"{module}1"
    _ok(
      run_launched(
        prepared_data_dir,
        "eval" if module == "evaluate" else module,
        args + [f'--gin.OUTPUT_DIR="{out2}"'],
      )
    )
    _ok(run_single(prepared_data_dir, module, args + [f'--gin.OUTPUT_DIR="{out1}"']))
    names = sorted(os.listdir(out1))
    assert names and names == sorted(os.listdir(out2)), (module, names)
    for name in names:
      one_text, two_text = (out1 / name).read_text(), (out2 / name).read_text()
      assert one_text and one_text == two_text, (module, name)


# ------------------------------------------------------------------------- lifelong runner
LIFELONG_ARGS = ["--gin_file=lifelong/tiny_test.gin", "--gin.RunnerConfig.data_shards=2"]
LIFELONG_TIMEOUT_S = 1800
WRITE_AUDIT = os.path.join(REPO, "tests", "write_audit")
# Keys whose values are host wall-clock measurements (differ between any two runs).
WALL_CLOCK_KEYS = frozenset({"timing", "step_time", "tokens_per_second"})
# Checkpoint files each process writes for its own shards (TensorStore / tf.data iterator).
PER_PROCESS = re.compile(r"(array_metadatas/process_\d+|ocdbt\.process_\d+|process_\d+-of-\d+)")
# Random parts of temporary names (tempfile suffixes, orbax / manifest tmp ids).
# Temporary names carry a random part and (for report files) the writer's pid: ".name.<pid>.<rand>.tmp".
RANDOM_TMP = re.compile(r"(\.[0-9]+)?\.[A-Za-z0-9_]{8}\.tmp$|\.tmp-[0-9a-f]{32}$")


def _audited_env(data_dir: str, model_dir: str, log_dir: str) -> dict[str, str]:
  env = _env(data_dir)
  env.update(
    PYTHONPATH=os.pathsep.join(p for p in (WRITE_AUDIT, env.get("PYTHONPATH")) if p),
    LIFELONG_MOE_WRITE_AUDIT_ROOT=model_dir,
    LIFELONG_MOE_WRITE_AUDIT_LOG=log_dir,
  )
  return env


def _lifelong_run(data_dir: str, root, name: str, processes: int) -> dict:
  model_dir, log_dir = str(root / name), str(root / f"{name}_writes")
  args = [*LIFELONG_ARGS, f'--gin.MODEL_DIR="{model_dir}"']
  env = _audited_env(data_dir, model_dir, log_dir)
  start = time.perf_counter()
  if processes == 1:
    proc = subprocess.run(
      [sys.executable, "-m", "lifelong_moe_jax.run_lifelong", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=LIFELONG_TIMEOUT_S,
    )
  else:
    proc = subprocess.run(
      _launch_cmd("lifelong", args),
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=LIFELONG_TIMEOUT_S,
    )
  log = _ok(proc)
  writes = []
  for name_ in sorted(os.listdir(log_dir)):
    writes += summaries.read_jsonl(os.path.join(log_dir, name_))
  return {"dir": model_dir, "log": log, "writes": writes, "wall": time.perf_counter() - start}


@pytest.fixture(scope="module")
def lifelong_runs(prepared_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("lifelong")
  return {n: _lifelong_run(prepared_data_dir, root, f"p{n}", n) for n in (1, 2)}


def _numbers(value, path=""):
  """``{path: number}`` of every numeric leaf outside wall-clock entries; other leaves as-is."""
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      if k not in WALL_CLOCK_KEYS:
        out.update(_numbers(v, f"{path}/{k}"))
    return out
  if isinstance(value, list):
    out = {}
    for i, v in enumerate(value):
      out.update(_numbers(v, f"{path}/{i}"))
    return out
  return {path: value}


def _max_diff(a: dict, b: dict) -> float:
  """Largest ``|a - b| / max(1, |a|)`` over equal keys; non-numbers must be equal."""
  assert sorted(a) == sorted(b)
  worst = 0.0
  for key, x in a.items():
    y = b[key]
    if isinstance(x, (int, float)) and not isinstance(x, bool):
      worst = max(worst, abs(x - y) / max(1.0, abs(x)))
    else:
      assert x == y, (key, x, y)
  return worst


def test_lifelong_runner_in_two_processes_equals_one_process(lifelong_runs):
  """report.json and every phase's train metrics of the 2 x 4 run equal the 1 x 8 run's (within
  1e-5, relative for values above 1, e.g. perplexities); expansion, freezing and distillation ran."""
  one, two = lifelong_runs[1], lifelong_runs[2]
  reports = []
  for run in (one, two):
    with open(os.path.join(run["dir"], "report.json")) as f:
      reports.append(json.load(f))
  report_diff = _max_diff(_numbers(reports[0]), _numbers(reports[1]))
  assert report_diff <= 1e-5, report_diff
  moe = reports[1]["methods"]["lifelong_moe"]
  assert [p["experts_per_layer"] for p in moe["phases"]] == [[2], [4], [6]]
  assert [p["data_shards"] for p in moe["phases"]] == [2, 2, 2]
  for i in (0, 1):  # freezing set up on both processes
    assert f"[{i}] " in two["log"]
    assert re.search(
      rf"\[{i}\] .*phase code_py: experts \[0, 2\) and their router columns frozen", two["log"]
    )
  metrics_diff = 0.0
  for method, phase in [("shared", "phase_0_wiki_en")] + [
    (m, p) for m in ("lifelong_moe", "finetune") for p in ("phase_1_code_py", "phase_2_dialog_en")
  ]:
    a, b = (_records(os.path.join(r["dir"], method, phase)) for r in (one, two))
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    metrics_diff = max(metrics_diff, _max_diff(_numbers(a), _numbers(b)))
    if method == "lifelong_moe":
      assert all(r["reg/distillation/loss"] > 0 for r in b)
  assert metrics_diff <= 1e-5, metrics_diff
  with open(os.path.join("/tmp", "lifelong_moe_multiprocess_lifelong.json"), "w") as f:
    json.dump(
      {
        "report_max_diff": report_diff,
        "metrics_max_diff": metrics_diff,
        "wall_s": {"1x8": one["wall"], "2x4": two["wall"]},
      },
      f,
    )
  print(f"report max diff {report_diff:.3g}, metrics max diff {metrics_diff:.3g}")


def _normalised(path: str) -> str:
  return RANDOM_TMP.sub(".*.tmp", path)


def test_lifelong_runner_in_two_processes_writes_every_file_once(lifelong_runs):
  """No file under MODEL_DIR is written by two processes; process 1 writes only its own
  checkpoint shards; process 0 writes exactly what the 1-process run writes (same files, same
  number of times); no temporary file is left."""
  one, two = lifelong_runs[1], lifelong_runs[2]
  writers: dict[str, set[int]] = {}
  for w in two["writes"]:
    writers.setdefault(w["path"], set()).add(w["process"])
  shared = sorted(p for p, procs in writers.items() if len(procs) > 1)
  assert not shared, shared[:20]
  by_process_1 = sorted(p for p, procs in writers.items() if 1 in procs)
  assert by_process_1 and all(PER_PROCESS.search(p) for p in by_process_1), by_process_1[:20]

  def counts(writes, process):
    return collections.Counter(
      (w["event"], _normalised(w["path"]))
      for w in writes
      if w["process"] == process and not PER_PROCESS.search(w["path"])
    )

  expected, actual = counts(one["writes"], 0), counts(two["writes"], 0)
  assert expected and actual == expected, (actual - expected, expected - actual)
  for run in (one, two):
    files = [
      os.path.relpath(os.path.join(d, f), run["dir"])
      for d, _, names in os.walk(run["dir"])
      for f in names
    ]
    assert not [f for f in files if ".tmp" in f], files
    events = collections.Counter(os.path.dirname(f) for f in files if "tfevents" in f)
    assert events and set(events.values()) == {1}, events


def test_processes_with_different_device_counts_stop_before_any_work(prepared_data_dir, tmp_path):
  """``launch/local.py --devices_per_process=4,2``: one clear error naming the device counts, exit
  code 2, nothing written."""
  model_dir = tmp_path / "run"
  proc = run_launched(
    prepared_data_dir,
    "lifelong",
    [*LIFELONG_ARGS, f'--gin.MODEL_DIR="{model_dir}"'],
    devices="4,2",
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert errors, proc.stderr[-3000:]
  for line in errors:
    assert re.match(
      r"\[([01])\] error: The processes of this run disagree: process ([01]) differs from process "
      r"\1 in local_devices \(process \2: ([24]), process \1: ([24])\)\.",
      line,
    ), line
  assert "=====" not in proc.stderr and not model_dir.exists()
