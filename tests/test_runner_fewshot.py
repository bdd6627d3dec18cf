"""The lifelong runner evaluates embedded few-shot tasks after every phase and reports them."""

import gin
import numpy as np

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong import runner as runner_lib

FEWSHOT_TASKS = ["fewshot_polarity", "fewshot_wiki_cloze"]


def test_fewshot_scores_after_every_phase(tmp_path, prepared_data_dir):
  model_dir = str(tmp_path / "run")
  gin.clear_config()
  gin_utils.parse_gin(
    ["lifelong/tiny_test.gin"],
    [
      f"MODEL_DIR = '{model_dir}'",
      'LifelongSchedule.phases = [{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 4},'
      ' {"name": "dialog_en", "mixture": "lifelong_dialog_en", "steps": 4, "add_experts": 2}]',
      "FewshotEval.enabled = True",
      f"FewshotEval.task_names = {FEWSHOT_TASKS}",
      "FewshotEval.k = 1",
      "FewshotEval.max_examples = 8",
    ],
    finalize=False,
  )
  try:
    report = runner_lib.LifelongRunner(methods=["lifelong_moe"], data_dir=prepared_data_dir).run()
  finally:
    gin.clear_config()
  phases = report["methods"]["lifelong_moe"]["phases"]
  assert len(phases) == 2
  for phase in phases:
    scores = phase["callbacks"]["fewshot"]
    assert sorted(scores) == FEWSHOT_TASKS
    assert scores["fewshot_polarity"]["chance"] == 50.0
    assert scores["fewshot_wiki_cloze"]["chance"] == 25.0
    for task in FEWSHOT_TASKS:
      assert scores[task]["num_examples"] == 8
      assert scores[task]["num_shots"] == 1 and scores[task]["primary_metric"] == "accuracy"
      assert 0.0 <= scores[task]["accuracy"] <= 100.0
      # 8 examples: an accuracy is a multiple of 12.5 %.
      assert np.isclose(scores[task]["accuracy"] % 12.5, 0.0) or np.isclose(
        scores[task]["accuracy"] % 12.5, 12.5
      )
  assert report_lib.load_report(model_dir) == report
  summary = report["methods"]["lifelong_moe"]["fewshot"]["fewshot_wiki_cloze"]
  assert summary["scores"] == [
    p["callbacks"]["fewshot"]["fewshot_wiki_cloze"]["accuracy"] for p in phases
  ]
  assert (tmp_path / "run" / "fewshot.png").exists()
