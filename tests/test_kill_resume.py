"""SIGKILL at 5 seeded random moments of a lifelong run, then resume: the same results.

The run: the tiny 3-phase schedule (gin/lifelong/tiny_test.gin) with lifelong_moe and finetune,
through the run_lifelong CLI exactly as a user starts it. One uninterrupted reference run; then one
run in another folder whose process group is SIGKILLed at 5 moments, drawn with a fixed seed as
fractions of the reference's wall time after its start-up (counted, in the interrupted run, from
the end of each launch's start-up, so the kills spread over the run's work and not over its
repeated start-ups), relaunched with the same command after each kill, and finally left to finish.
Both report.json files, and every phase_result.json, step0_eval.json and lifelong_run.json, must
be identical once the ``timing`` entries (host wall clock: report.TIMING_KEY) are removed; no
temporary folder or partial file may remain.

tests/test_runner.py kills one run once, at a chosen moment (a mid-phase checkpoint); the kills
here are not chosen: they land in surgery, training, checkpoint writes, evaluation or report
writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from cli_env import COMPILE_CACHE, cli_env

from lifelong_moe_jax.lifelong import report as report_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = "lifelong/tiny_test.gin"
METHODS = "lifelong_moe,finetune"
# The XLA cache of the other CLI tests (tests/test_trainer_cli.py): runs after the first load their
# executables instead of compiling.
SEED = 0
KILLS = 5
MIN_GAP = 0.08  # between two kills, as a fraction of the reference's time after start-up
TIMEOUT_S = 900
RESULT_FILES = ("phase_result.json", "step0_eval.json")
# Logged by LifelongRunner.run() once start-up is over (runner.enable_compilation_cache).
STARTED = b"JAX persistent compilation cache:"


def _command(model_dir: str, data_dir: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "lifelong_moe_jax.run_lifelong",
    f"--gin_file={SCHEDULE}",
    f'--gin.MODEL_DIR="{model_dir}"',
    "--methods",
    METHODS,
    "--data_dir",
    data_dir,
    f"--gin.RunnerConfig.compilation_cache_dir='{COMPILE_CACHE}'",
  ]


def _env() -> dict[str, str]:
  return cli_env(compile_cache=False)  # the runner's cache setting applies (and logs STARTED)


@contextlib.contextmanager
def _launched(model_dir: str, data_dir: str, log_path: str) -> Iterator[subprocess.Popen]:
  """Starts the run in its own process group; kills the group if it still runs at the end."""
  with open(log_path, "ab") as log:
    proc = subprocess.Popen(
      _command(model_dir, data_dir),
      cwd=REPO,
      env=_env(),
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,  # its own process group: the kill takes every child along
    )
  try:
    yield proc
  finally:
    if proc.poll() is None:  # a kill moment, or a failed assertion: no run outlives the test
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def _tail(log_path: str) -> str:
  with open(log_path, encoding="utf-8", errors="replace") as f:
    return f.read()[-5000:]


def kill_moments(seed: int = SEED, count: int = KILLS, min_gap: float = MIN_GAP) -> list[float]:
  """``count`` sorted fractions in (0.05, 0.9), at least ``min_gap`` apart, drawn with ``seed``."""
  rng = random.Random(seed)
  while True:
    moments = sorted(rng.uniform(0.05, 0.9) for _ in range(count))
    if all(b - a >= min_gap for a, b in zip([0.0, *moments], moments)):
      return moments


def _json_files(model_dir: str) -> dict[str, object]:
  """``{relative path: content without timing}`` of the run's result files."""
  out = {}
  for folder, dirs, files in os.walk(model_dir):
    dirs[:] = [d for d in dirs if d != "checkpoints"]
    for name in files:
      if name in RESULT_FILES or folder == model_dir and name.endswith(".json"):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
          out[os.path.relpath(path, model_dir)] = report_lib.without_timing(json.load(f))
  return out


def _leftovers(model_dir: str) -> list[str]:
  """Temporary folders/files: ``*.tmp`` (runner, surgery, atomic JSON) and orbax ``*-tmp-*``."""
  found = []
  for folder, dirs, files in os.walk(model_dir):
    for name in dirs + files:
      if ".tmp" in name or "-tmp-" in name or name.endswith("~"):
        found.append(os.path.relpath(os.path.join(folder, name), model_dir))
  return found


def _wait_for_start(proc: subprocess.Popen, log_path: str) -> bool:
  """Waits until the run is past its start-up (imports, mesh, vocabulary); False if it ended."""
  deadline = time.time() + TIMEOUT_S
  while proc.poll() is None:
    with open(log_path, "rb") as f:
      if STARTED in f.read():
        return True
    assert time.time() < deadline, _tail(log_path)
    time.sleep(0.1)
  return False


@pytest.fixture(scope="module")
def reference(prepared_data_dir, tmp_path_factory):
  """The uninterrupted run: ``(model_dir, start-up seconds, seconds after the start-up)``."""
  model_dir = str(tmp_path_factory.mktemp("reference") / "run")
  log_path = model_dir + ".log"
  launched = time.perf_counter()
  with _launched(model_dir, prepared_data_dir, log_path) as proc:
    assert _wait_for_start(proc, log_path), _tail(log_path)
    started = time.perf_counter()
    code = proc.wait(timeout=TIMEOUT_S)
  assert code == 0, _tail(log_path)
  return model_dir, started - launched, time.perf_counter() - started


@pytest.fixture(scope="module")
def interrupted(reference, prepared_data_dir, tmp_path_factory):
  """The killed run. Kill k comes (moment_k - moment_k-1) x the reference's post-start-up time
  after the k-th launch is past its own start-up, so the kills spread over the run's work rather
  than over its repeated start-ups; returns ``(model_dir, [(moment, exit code)], log folder)``."""
  _, _, work = reference
  root = tmp_path_factory.mktemp("interrupted")
  model_dir = str(root / "run")
  kills, previous = [], 0.0
  for k, moment in enumerate(kill_moments()):
    log_path = str(root / f"launch_{k}.log")
    with _launched(model_dir, prepared_data_dir, log_path) as proc:
      if _wait_for_start(proc, log_path):
        try:
          proc.wait(timeout=(moment - previous) * work)
        except subprocess.TimeoutExpired:
          pass  # _launched kills its process group
    kills.append((moment, proc.returncode))
    previous = moment
  log_path = str(root / "final.log")
  with _launched(model_dir, prepared_data_dir, log_path) as proc:
    code = proc.wait(timeout=TIMEOUT_S)
  assert code == 0, _tail(log_path)
  return model_dir, kills, str(root)


def test_kill_moments_are_seeded():
  assert kill_moments() == kill_moments()
  assert kill_moments(seed=1) != kill_moments()


def test_every_kill_landed(interrupted):
  _, kills, logs = interrupted
  assert [code for _, code in kills] == [-signal.SIGKILL] * KILLS, (kills, logs)


def test_sigkilled_run_resumes_to_the_same_results(reference, interrupted):
  ref_dir = reference[0]
  model_dir, _, _ = interrupted
  want, got = _json_files(ref_dir), _json_files(model_dir)
  assert "report.json" in want and "lifelong_run.json" in want
  assert sum(p.endswith("phase_result.json") for p in want) == 5  # shared phase 0 + 2 x 2
  assert sorted(got) == sorted(want)
  for path in want:
    assert got[path] == want[path], path
  report = got["report.json"]
  for method in METHODS.split(","):
    assert report["methods"][method]["complete"], method
    assert report["methods"][method]["phases_completed"] == 3


def test_no_temporary_or_partial_files_remain(reference, interrupted):
  model_dir, _, _ = interrupted
  assert _leftovers(model_dir) == []
  assert _leftovers(reference[0]) == []
