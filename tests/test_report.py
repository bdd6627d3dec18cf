"""The lifelong report from synthetic phase results: matrices, forgetting, markdown, figures."""

import json
import os

import pytest

from lifelong_moe_jax.lifelong import report as report_lib

TASKS = ["lifelong_a", "lifelong_b", "lifelong_c"]
SCHEDULE = {
  "phases": [
    {"name": "a", "mixture": "lifelong_a", "steps": 10, "add_experts": 0},
    {"name": "b", "mixture": "lifelong_b", "steps": 10, "add_experts": 2},
    {"name": "c", "mixture": "lifelong_c", "steps": 10, "add_experts": 2},
  ],
  "methods": ["lifelong_moe", "finetune"],
  "extra_eval_tasks": [],
  "task_feature_lengths": {"targets": 32},
  "batch_size": 8,
  "eval_batch_size": 8,
  "eval_max_batches": 2,
  "seed": 0,
}
PHASE_TASKS = [["lifelong_a"], ["lifelong_b"], ["lifelong_c"]]


def _phase(index, experts, ppl, step_time):
  return {
    "format_version": 1,
    "phase_index": index,
    "phase": "abc"[index],
    "num_experts": experts,
    "experts_per_layer": [experts, experts] if experts else [],
    "expert_slices": {"a": [0, 2], "b": [2, 4], "c": [4, 6]} if experts == 6 else {},
    "eval": {
      t: {
        "loss": 1.0,
        "perplexity": ppl[t],
        **({"expert_usage": [[1.0 / experts] * experts] * 2} if experts else {}),
      }
      for t in TASKS
    },
    "train": {"loss": 2.0},
    "timing": {"step_time": step_time, "tokens_per_second": 100.0},
  }


def _results():
  moe = [
    _phase(0, 2, {"lifelong_a": 10.0, "lifelong_b": 50.0, "lifelong_c": 60.0}, 0.1),
    _phase(1, 4, {"lifelong_a": 12.0, "lifelong_b": 20.0, "lifelong_c": 55.0}, 0.11),
    _phase(2, 6, {"lifelong_a": 13.0, "lifelong_b": 22.0, "lifelong_c": 30.0}, 0.12),
  ]
  dense = [
    _phase(0, 0, {"lifelong_a": 11.0, "lifelong_b": 50.0, "lifelong_c": 60.0}, 0.2),
    _phase(1, 0, {"lifelong_a": 30.0, "lifelong_b": 21.0, "lifelong_c": 55.0}, 0.2),
  ]
  return {"lifelong_moe": moe, "dense_finetune": dense}


def _report():
  return report_lib.build_report(
    schedule=SCHEDULE,
    model_config={"num_experts": 2},
    options={},
    eval_tasks=TASKS,
    phase_tasks=PHASE_TASKS,
    results=_results(),
  )


def test_matrices_and_forgetting():
  report = _report()
  moe = report["methods"]["lifelong_moe"]
  assert moe["complete"] and moe["phases_completed"] == 3
  assert moe["perplexity"]["lifelong_a"] == [10.0, 12.0, 13.0]
  assert moe["forgetting"] == {
    "lifelong_a": pytest.approx(3.0),
    "lifelong_b": pytest.approx(2.0),
    "lifelong_c": pytest.approx(0.0),
  }
  assert moe["perplexity_after_own_phase"]["lifelong_b"] == 20.0
  assert moe["mean_final_perplexity"] == pytest.approx((13 + 22 + 30) / 3)
  assert moe["experts_per_layer"] == [[2, 2], [4, 4], [6, 6]]
  dense = report["methods"]["dense_finetune"]
  assert not dense["complete"] and dense["phases_completed"] == 2
  # incomplete: forgetting up to the last completed phase; c never trained yet
  assert dense["forgetting"] == {
    "lifelong_a": pytest.approx(19.0),
    "lifelong_b": 0.0,
    "lifelong_c": None,
  }
  assert "format_version" not in moe["phases"][0]
  json.dumps(report)  # JSON-able


def test_without_timing_drops_only_timing():
  report = _report()
  stripped = report_lib.without_timing(report)
  assert "timing" not in stripped["methods"]["lifelong_moe"]["phases"][0]
  assert stripped["methods"]["lifelong_moe"]["phases"][0]["train"] == {"loss": 2.0}


def test_markdown_and_figures(tmp_path):
  report = _report()
  paths = report_lib.write_report(str(tmp_path), report)
  md = open(paths["md"], encoding="utf-8").read()
  assert "| lifelong_moe | 3 | 13.00 | 22.00 | 30.00 |" in md
  assert "| a | **10.00** | 12.00 | 13.00 | +3.00 |" in md
  assert "| c | 60.00 | 55.00 | - |" in md  # dense_finetune: c not trained yet
  assert "0.100 / 0.110 / 0.120" in md
  assert json.load(open(paths["json"], encoding="utf-8")) == report
  for key in ("forgetting_png", "usage_png_lifelong_moe"):
    with open(paths[key], "rb") as f:
      assert f.read(4) == b"\x89PNG"
  assert "usage_png_dense_finetune" not in paths  # dense: no expert usage
  assert "fewshot_png" not in paths and "fewshot.png" not in md  # no few-shot scores
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_headline_table():
  lines = report_lib.headline_table(_report())
  assert lines[0] == (
    "| method | a after a | a at end | forgetting | c at end | s/step per phase |"
  )
  assert lines[2] == "| lifelong_moe | 10.00 | 13.00 | +3.00 | 30.00 | 0.100 / 0.110 / 0.120 |"


def test_fewshot_scores_in_report(tmp_path):
  results = _results()
  for i, phase in enumerate(results["lifelong_moe"]):
    phase["callbacks"] = {
      "fewshot": {
        "cloze": {"accuracy": 25.0 + i, "chance": 25.0, "num_examples": 8},
        "reply": {
          "accuracy": 40.0,
          "accuracy_norm": 30.0 + i,
          "chance": 25.0,
          "num_examples": 8,
          "primary_metric": "accuracy_norm",
          "num_shots": 0,
        },
      }
    }
  report = report_lib.build_report(
    schedule=SCHEDULE,
    model_config={},
    options={},
    eval_tasks=TASKS,
    phase_tasks=PHASE_TASKS,
    results=results,
  )
  assert report["methods"]["lifelong_moe"]["fewshot"] == {
    "cloze": {
      "metric": "accuracy",
      "chance": 25.0,
      "num_examples": 8,
      "scores": [25.0, 26.0, 27.0],
    },
    "reply": {
      "metric": "accuracy_norm",
      "chance": 25.0,
      "num_shots": 0,
      "num_examples": 8,
      "scores": [30.0, 31.0, 32.0],
    },
  }
  assert report["methods"]["dense_finetune"]["fewshot"] == {}
  md = report_lib.render_markdown(report)
  assert "| lifelong_moe | cloze | ? | accuracy | 25.0 | 25.0 | 26.0 | 27.0 |" in md
  assert "| lifelong_moe | reply | 0 | accuracy_norm | 25.0 | 30.0 | 31.0 | 32.0 |" in md
  assert "![few-shot scores after each phase](fewshot.png)" in md
  paths = report_lib.write_report(str(tmp_path), report)
  with open(paths["fewshot_png"], "rb") as f:
    assert f.read(4) == b"\x89PNG"
