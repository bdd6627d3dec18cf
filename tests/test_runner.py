"""Acceptance tests of the lifelong runner on the tiny 3-phase schedule (gin/lifelong/tiny_test.gin).

One in-process run of lifelong_moe and finetune (2 -> 4 -> 6 experts for lifelong_moe, 8 steps per
phase) is shared by the tests: full report, expert counts, old expert slices bit-identical across
phases, resume/skip behaviour. A second run is killed with SIGKILL in the middle of a phase (and
left with a half-written surgery folder), restarted, and must give the same report numbers.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from lifelong_moe_jax import param_tree
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong import runner as runner_lib
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong.phase_record import PhaseRecord
from lifelong_moe_jax.models.lm import LanguageModel
from lifelong_moe_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = "lifelong/tiny_test.gin"
TASKS = ["lifelong_wiki_en", "lifelong_code_py", "lifelong_dialog_en"]


def run_tiny(model_dir, data_dir, methods, bindings=()):
  """Runs the tiny schedule in-process; returns (runner, report)."""
  gin.clear_config()
  gin_utils.parse_gin([SCHEDULE], [f"MODEL_DIR = '{model_dir}'", *bindings], finalize=False)
  try:
    runner = runner_lib.LifelongRunner(methods=methods, data_dir=data_dir)
    return runner, runner.run()
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def cache_binding(tmp_path_factory):
  """One JAX compilation cache for every run of this module (the subprocess included)."""
  path = tmp_path_factory.getbasetemp() / "jax_cache"
  return f"RunnerConfig.compilation_cache_dir = '{path}'"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prepared_data_dir, cache_binding):
  model_dir = str(tmp_path_factory.mktemp("lifelong") / "run")
  runner, report = run_tiny(
    model_dir, prepared_data_dir, ["lifelong_moe", "finetune"], [cache_binding]
  )
  return runner, report, model_dir


def _restore(runner, model, step_dir):
  return checkpoints.restore_model_params(step_dir, model, runner.partitioner)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint32) if x.dtype == np.float32 else x


def test_full_report(tiny_run):
  _, report, model_dir = tiny_run
  for name in (
    "report.json",
    "report.md",
    "forgetting.png",
    "expert_usage_lifelong_moe.png",
    "expert_usage_finetune.png",
  ):
    path = os.path.join(model_dir, name)
    assert os.path.getsize(path) > 0, name
    if name.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert report_lib.load_report(model_dir) == report
  assert report["eval_tasks"] == TASKS
  assert report["phase_names"] == ["wiki_en", "code_py", "dialog_en"]
  for method in ("lifelong_moe", "finetune"):
    m = report["methods"][method]
    assert m["complete"] and m["phases_completed"] == 3
    for p in m["phases"]:
      assert sorted(p["eval"]) == sorted(TASKS)  # seen and unseen distributions
      for task, values in p["eval"].items():
        assert np.isfinite(values["loss"]) and values["perplexity"] == pytest.approx(
          np.exp(values["loss"])
        )
        usage = np.asarray(values["expert_usage"])
        assert usage.shape == (1, p["num_experts"])  # tiny: one MoE layer
        np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)
      assert p["timing"]["step_time"] > 0 and p["timing"]["tokens_per_second"] > 0
      assert np.isfinite(p["train"]["loss"])
    # forgetting = ppl after the last phase - ppl right after the distribution's own phase
    for i, task in enumerate(TASKS):
      ppl = m["perplexity"][task]
      assert m["forgetting"][task] == pytest.approx(ppl[2] - ppl[i])
  # the shared first phase is identical for both methods
  first = [report["methods"][m]["phases"][0]["eval"] for m in ("lifelong_moe", "finetune")]
  assert first[0] == first[1]
  md = open(os.path.join(model_dir, "report.md"), encoding="utf-8").read()
  assert "| lifelong_moe | 3 |" in md and "| finetune | 3 |" in md
  assert "after dialog_en" in md and "forgetting" in md and "s/step" in md


def test_experts_grow_per_phase(tiny_run):
  runner, report, _ = tiny_run
  assert report["methods"]["lifelong_moe"]["experts_per_layer"] == [[2], [4], [6]]
  assert report["methods"]["finetune"]["experts_per_layer"] == [[2], [2], [2]]
  assert report["methods"]["lifelong_moe"]["phases"][2]["expert_slices"] == {
    "wiki_en": [0, 2],
    "code_py": [2, 4],
    "dialog_en": [4, 6],
  }
  for index, want in enumerate([2, 4, 6]):
    model = LanguageModel(runner.config_for("lifelong_moe", index))
    params = _restore(runner, model, runner.final_step_dir("lifelong_moe", index))
    counts = param_tree.expert_counts(params, model.params_logical_axes())
    assert counts and set(counts.values()) == {want}, counts
    from lifelong_moe_jax import checkpoints  # pylint: disable=import-outside-toplevel

    meta = checkpoints.read_metadata(runner.final_step_dir("lifelong_moe", index))
    record = PhaseRecord.from_dict(meta["lifelong"]["phase_record"])
    assert record.num_experts == want and len(record.phases) == index + 1


def test_old_expert_slices_bit_identical(tiny_run):
  runner, _, _ = tiny_run
  finals = []
  for index in range(3):
    model = LanguageModel(runner.config_for("lifelong_moe", index))
    params = jax.device_get(_restore(runner, model, runner.final_step_dir("lifelong_moe", index)))
    finals.append((params, model.params_logical_axes()))
  last, axes = finals[2]
  _, last_infos = param_tree.flatten_with_axes(last, axes)
  for index, experts in ((0, 2), (1, 4)):
    params, p_axes = finals[index]
    _, infos = param_tree.flatten_with_axes(params, p_axes)
    checked = 0
    for old, new in zip(infos, last_infos):
      assert old.key == new.key
      if old.expert_axis is None:
        continue
      old_slice = np.take(old.value, np.arange(experts), axis=old.expert_axis)
      new_slice = np.take(new.value, np.arange(experts), axis=new.expert_axis)
      assert np.array_equal(_bits(old_slice), _bits(new_slice)), (index, old.key)
      checked += 1
    assert checked >= 3  # wi, wo and the router kernel
  # finetune's experts are not frozen: they changed between its first and last phase
  ft = [
    jax.device_get(
      _restore(
        runner,
        LanguageModel(runner.config_for("finetune", i)),
        runner.final_step_dir("finetune", i),
      )
    )
    for i in (0, 2)
  ]
  _, f0 = param_tree.flatten_with_axes(ft[0], finals[0][1])
  _, f2 = param_tree.flatten_with_axes(ft[1], finals[0][1])
  assert any(
    not np.array_equal(a.value, b.value) for a, b in zip(f0, f2) if a.expert_axis is not None
  )


def test_rerun_skips_complete_phases(tiny_run, prepared_data_dir, cache_binding):
  _, report, model_dir = tiny_run
  t0 = time.perf_counter()
  _, again = run_tiny(model_dir, prepared_data_dir, ["lifelong_moe", "finetune"], [cache_binding])
  assert time.perf_counter() - t0 < 60
  assert again == report


def test_changed_schedule_is_refused(tiny_run, prepared_data_dir, cache_binding):
  _, _, model_dir = tiny_run
  with pytest.raises(runner_lib.LifelongError, match="different"):
    run_tiny(
      model_dir, prepared_data_dir, ["finetune"], ["LifelongSchedule.seed = 1", cache_binding]
    )


def test_sigkill_mid_phase_then_restart_gives_same_report(
  tiny_run, tmp_path, prepared_data_dir, cache_binding
):
  _, reference, ref_dir = tiny_run
  model_dir = str(tmp_path / "killed")
  # Phases 0 and 1 as the reference left them (they are deterministic): the killed run starts with
  # the surgery of phase 2, so the kill lands in the middle of phase 2 quickly.
  for part in (runner_lib.SHARED_DIR, os.path.join("lifelong_moe", "phase_1_code_py")):
    shutil.copytree(os.path.join(ref_dir, part), os.path.join(model_dir, part))
  # An earlier crash in the middle of phase 2's surgery left a temporary folder behind.
  debris = os.path.join(model_dir, "lifelong_moe", "phase_2_dialog_en.tmp")
  os.makedirs(os.path.join(debris, "checkpoints", "16.orbax-checkpoint-tmp-1"))
  phase_dir = os.path.join(model_dir, "lifelong_moe", "phase_2_dialog_en")
  mid_checkpoint = os.path.join(phase_dir, "checkpoints", "20")
  cmd = [
    sys.executable,
    "-m",
    "lifelong_moe_jax.run_lifelong",
    f"--gin_file={SCHEDULE}",
    f"--gin.MODEL_DIR=\"{model_dir}\"",
    "--methods=lifelong_moe",
    f"--data_dir={prepared_data_dir}",
    f"--gin_bindings={cache_binding}",
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 400
  while not os.path.isdir(mid_checkpoint):
    if proc.poll() is not None:
      pytest.fail(f"the run ended before the mid-phase checkpoint: {proc.stderr.read()[-3000:]}")
    assert time.time() < deadline, "no mid-phase checkpoint in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert not os.path.exists(debris)  # cleaned up
  assert not os.path.exists(os.path.join(phase_dir, phase_results.RESULT_FILE))  # killed mid-phase
  _, report = run_tiny(model_dir, prepared_data_dir, ["lifelong_moe"], [cache_binding])
  resumed = report["methods"]["lifelong_moe"]["phases"][2]["timing"]
  assert resumed["trained_steps_this_invocation"] < 8  # resumed from step 20, not retrained
  assert report_lib.without_timing(report["methods"]["lifelong_moe"]) == report_lib.without_timing(
    reference["methods"]["lifelong_moe"]
  )
