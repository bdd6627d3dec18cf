"""Step-0 evaluation, routing analysis and their backfill in a tiny 2-phase run.

One in-process run of lifelong_moe (2 -> 4 experts) and multitask_final (4 experts from the
start) on gin/lifelong/tiny_test.gin cut to two phases of 4 steps.
"""

import copy
import os
import shutil

import gin
import numpy as np
import pytest

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.lifelong import phase_analysis
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import runner as runner_lib
from lifelong_moe_jax.models import lm

SCHEDULE = "lifelong/tiny_test.gin"
METHODS = ["lifelong_moe", "multitask_final"]
TASKS = ["lifelong_wiki_en", "lifelong_code_py"]
TWO_PHASES = (
  'LifelongSchedule.phases = ['
  '{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 4}, '
  '{"name": "code_py", "mixture": "lifelong_code_py", "steps": 4, "add_experts": 2}]'
)
ANALYSIS_KEYS = ("routing", "routing_at_start", "eval_at_start")


def _runner(model_dir, data_dir):
  return runner_lib.LifelongRunner(methods=METHODS, data_dir=data_dir, model_dir=model_dir)


def _parse(model_dir):
  gin.clear_config()
  gin_utils.parse_gin([SCHEDULE], [f"MODEL_DIR = '{model_dir}'", TWO_PHASES], finalize=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared_data_dir):
  model_dir = str(tmp_path_factory.mktemp("analysis") / "run")
  _parse(model_dir)
  try:
    runner = _runner(model_dir, prepared_data_dir)
    report = runner.run()
  finally:
    gin.clear_config()
  return runner, report, model_dir


def _result(runner, method, index):
  return phase_results.read_json(
    os.path.join(runner.phase_dir(method, index), phase_results.RESULT_FILE)
  )


def test_step0_evaluation_equals_a_separate_evaluation_of_the_expanded_checkpoint(run):
  runner, report, _ = run
  pdir = runner.phase_dir("lifelong_moe", 1)
  saved = phase_results.read_json(os.path.join(pdir, phase_analysis.STEP0_FILE))
  result = _result(runner, "lifelong_moe", 1)
  assert result["eval_at_start"] == saved["eval"] and saved["step"] == 4
  assert sorted(saved["eval"]) == sorted(TASKS)
  # A separate evaluation: loss_eval.Evaluator on the step-0 checkpoint (4 experts, restored).
  step_dir = checkpoints.resolve_step_dir(pdir, step=4)
  model = lm.LanguageModel(runner.config_for("lifelong_moe", 1))
  assert model.config.num_experts == 4
  params = checkpoints.restore_model_params(step_dir, model, runner.partitioner)
  sched = runner.schedule
  separate = loss_eval.Evaluator(
    model,
    runner.partitioner,
    TASKS,
    sched.task_feature_lengths,
    sched.eval_batch,
    max_batches=sched.eval_max_batches,
    data_dir=runner.data_dir,
  ).evaluate(params)
  for task in TASKS:
    for key in ("loss", "perplexity", "accuracy", "num_tokens"):
      assert saved["eval"][task][key] == pytest.approx(separate[task][key], rel=1e-6), (task, key)
  # the report: perplexity before (end of phase 0) vs right after expansion
  step0 = report["methods"]["lifelong_moe"]["step0"]
  assert step0[0] is None
  before = _result(runner, "lifelong_moe", 0)["eval"]["lifelong_wiki_en"]["perplexity"]
  change = step0[1]["lifelong_wiki_en"]
  assert change["before"] == before
  assert change["after_expansion"] == saved["eval"]["lifelong_wiki_en"]["perplexity"]
  assert change["relative_change"] == pytest.approx(change["after_expansion"] / before - 1)


def test_routing_in_phase_results_and_report(run):
  runner, report, model_dir = run
  for method in METHODS:
    for index in range(2):
      result = _result(runner, method, index)
      names = ["wiki_en", "code_py"][: index + 1]
      assert sorted(result["routing"]) == sorted(TASKS)
      for task, entry in result["routing"].items():
        assert entry["phases"] == names
        for key in ("top1", "topk"):
          assert sum(entry[key].values()) == pytest.approx(1.0)
          assert np.asarray(entry["per_layer"][key]).shape == (1, len(names))  # one MoE layer
        usage = np.asarray(result["eval"][task]["expert_usage_top1"])
        np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)
  # multitask_final: 4 experts from phase 0, all owned by the first phase
  assert [p["num_experts"] for p in report["methods"]["multitask_final"]["phases"]] == [4, 4]
  final = _result(runner, "multitask_final", 1)["routing"]["lifelong_code_py"]["top1"]
  assert final == {"wiki_en": pytest.approx(1.0), "code_py": 0.0}
  assert "routing_at_start" in _result(runner, "lifelong_moe", 1)
  md = open(os.path.join(model_dir, "report.md"), encoding="utf-8").read()
  assert "## Right after expansion" in md and "## Routing by owning phase" in md
  assert "| multitask_final |" in md
  assert os.path.getsize(os.path.join(model_dir, "routing.png")) > 0


def test_backfill_recomputes_missing_entries_from_checkpoints(run, prepared_data_dir):
  runner, _, model_dir = run
  originals = {}
  for method in METHODS:
    for index in range(2):
      path = os.path.join(runner.phase_dir(method, index), phase_results.RESULT_FILE)
      result = phase_results.read_json(path)
      originals[path] = copy.deepcopy(result)
      for key in ANALYSIS_KEYS:  # as written before these measurements existed
        result.pop(key, None)
      for values in result["eval"].values():
        values.pop("expert_usage_top1", None)
      phase_results.write_json_atomic(path, result)
    pdir = runner.phase_dir(method, 1)
    os.remove(os.path.join(pdir, phase_analysis.STEP0_FILE))
    # checkpoint rotation deleted the step-0 checkpoint: backfill rebuilds it
    shutil.rmtree(checkpoints.resolve_step_dir(pdir, step=4))
  _parse(model_dir)
  try:
    fresh = _runner(model_dir, prepared_data_dir)  # as `--report_only --backfill_analysis`
    updated = fresh.backfill_analysis()
    assert sorted(updated) == sorted(originals)
    assert fresh.backfill_analysis() == []  # nothing left to do
  finally:
    gin.clear_config()
  for path, original in originals.items():
    result = phase_results.read_json(path)
    for key in ANALYSIS_KEYS:
      assert (key in result) == (key in original), (path, key)
      if key in original:
        assert _close(result[key], original[key]), (path, key)
  assert not any(
    os.path.exists(os.path.join(runner.phase_dir(m, 1), phase_analysis.REBUILD_DIR))
    for m in METHODS
  )


def _close(a, b) -> bool:
  """Nested dicts/lists equal, floats within 1e-6 relative."""
  if isinstance(a, dict):
    return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
  if isinstance(a, list):
    return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
  if isinstance(a, float) or isinstance(b, float):
    return bool(np.isclose(a, b, rtol=1e-6, atol=1e-9))
  return a == b
