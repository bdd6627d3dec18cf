"""The report's step-0, routing, relative-forgetting and token-weighted NLL entries (synthetic)."""

import json
import math
import os

import pytest

from lifelong_moe_jax.lifelong import analysis_report
from lifelong_moe_jax.lifelong import claims
from lifelong_moe_jax.lifelong import report as report_lib

TASKS = ["lifelong_a", "lifelong_b"]
SCHEDULE = {
  "phases": [
    {"name": "a", "mixture": "lifelong_a", "steps": 10, "add_experts": 0},
    {"name": "b", "mixture": "lifelong_b", "steps": 10, "add_experts": 2},
  ],
  "methods": ["lifelong_moe"],
  "extra_eval_tasks": [],
  "task_feature_lengths": {"targets": 32},
  "batch_size": 8,
  "eval_batch_size": 8,
  "eval_max_batches": 2,
  "seed": 0,
}


def _eval(ppl_a, ppl_b, tokens=(100, 300)):
  return {
    t: {"loss": math.log(p), "perplexity": p, "num_tokens": n, "expert_usage": [[0.25] * 4]}
    for t, p, n in zip(TASKS, (ppl_a, ppl_b), tokens)
  }


def _routing(own_a, own_b):
  return {
    "lifelong_a": {
      "phases": ["a", "b"],
      "top1": {"a": own_a, "b": 1 - own_a},
      "topk": {"a": 0.7, "b": 0.3},
      "per_layer": {"top1": [[own_a, 1 - own_a]], "topk": [[0.7, 0.3]]},
    },
    "lifelong_b": {
      "phases": ["a", "b"],
      "top1": {"a": 1 - own_b, "b": own_b},
      "topk": {"a": 0.4, "b": 0.6},
      "per_layer": {"top1": [[1 - own_b, own_b]], "topk": [[0.4, 0.6]]},
    },
  }


def _report():
  phases = [
    {
      "phase_index": 0,
      "phase": "a",
      "num_experts": 2,
      "experts_per_layer": [2],
      "expert_slices": {"a": [0, 2]},
      "eval": _eval(10.0, 50.0),
      "routing": {
        "lifelong_a": {
          "phases": ["a"],
          "top1": {"a": 1.0},
          "topk": {"a": 1.0},
          "per_layer": {"top1": [[1.0]], "topk": [[1.0]]},
        }
      },
    },
    {
      "phase_index": 1,
      "phase": "b",
      "num_experts": 4,
      "experts_per_layer": [4],
      "expert_slices": {"a": [0, 2], "b": [2, 4]},
      "eval": _eval(12.0, 20.0),
      "eval_at_start": _eval(10.05, 49.0),
      "routing": _routing(0.95, 0.8),
      "routing_at_start": _routing(0.99, 0.5),
    },
  ]
  return report_lib.build_report(
    schedule=SCHEDULE,
    model_config={},
    options={},
    eval_tasks=TASKS,
    phase_tasks=[["lifelong_a"], ["lifelong_b"]],
    results={"lifelong_moe": phases},
  )


def test_relative_forgetting_and_token_weighted_nll():
  m = _report()["methods"]["lifelong_moe"]
  assert m["forgetting"]["lifelong_a"] == pytest.approx(2.0)
  assert m["relative_forgetting"] == {
    "lifelong_a": pytest.approx(20.0),
    "lifelong_b": pytest.approx(0.0),
  }
  assert m["mean_relative_forgetting"] == pytest.approx(10.0)
  want = (100 * math.log(12.0) + 300 * math.log(20.0)) / 400
  assert m["final_token_weighted_nll"] == pytest.approx(want)
  assert claims.final_nll_by_method(_report())["lifelong_moe"] == pytest.approx(want)


def test_step0_summary():
  m = _report()["methods"]["lifelong_moe"]
  assert m["step0"][0] is None
  a = m["step0"][1]["lifelong_a"]
  assert a["before"] == 10.0 and a["after_expansion"] == 10.05
  assert a["relative_change"] == pytest.approx(0.005)
  assert m["step0"][1]["lifelong_b"]["relative_change"] == pytest.approx(49.0 / 50.0 - 1)


def test_tables_figure_and_claim(tmp_path):
  report = _report()
  step0 = analysis_report.step0_table(report)
  assert step0[2] == "| lifelong_moe | b | a | 10.00 | 10.05 | +0.50% |"
  routing = analysis_report.routing_table(report)
  assert routing[0] == (
    "| method | after | distribution | top-1 % a | top-1 % b | top-k % a | top-k % b |"
  )
  assert "| lifelong_moe | a | a | 100.0 | - | 100.0 | - |" in routing
  assert "| lifelong_moe | b | b | 20.0 | 80.0 | 40.0 | 60.0 |" in routing
  paths = report_lib.write_report(str(tmp_path), report)
  md = open(paths["md"], encoding="utf-8").read()
  assert "## Right after expansion" in md and "## Routing by owning phase" in md
  assert "(routing.png)" in md and "rel. forgetting" in md and "token-weighted NLL" in md
  assert "| a | **10.00** | 12.00 | +2.00 | +20.0% |" in md
  with open(paths["routing_png"], "rb") as f:
    assert f.read(4) == b"\x89PNG"
  assert json.load(open(paths["json"], encoding="utf-8")) == report
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  # the claims read the same entries: new experts take 80% of b, 5% of a drifts to them
  report["methods"]["lifelong_moe"]["complete"] = True
  claim = {c.name: c for c in claims.evaluate_claims(report)}["routing"]
  assert claim.passed is True and "80.0%" in claim.measured and "5.0%" in claim.measured


def test_no_routing_no_sections():
  report = _report()
  for p in report["methods"]["lifelong_moe"]["phases"]:
    p.pop("routing")
  report["methods"]["lifelong_moe"]["step0"] = [None, None]
  assert analysis_report.markdown_sections(report) == []
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  assert analysis_report.routing_figure(report, plt) is None


def test_claims_for_a_variant_and_the_method_summary_table():
  """Claims checked for a variant (phase 0 without routing entries, as the runner writes it) and
  the per-method sweep table, against values computed by hand from the synthetic phases."""
  report = _report()
  base = report["methods"]["lifelong_moe"]
  base["phases"][0].pop("routing")
  base["complete"] = True
  spec = {"name": "lm_v", "expand": True, "option_overrides": {"distill_weight": 0.3}}
  variant = json.loads(json.dumps(base))
  variant["spec"] = spec
  variant["phases"][1]["routing"] = _routing(0.6, 0.3)  # 40% of a drifts, new take only 30% of b
  report["methods"] = {"lifelong_moe": base, "lm_v": variant}
  checked = {c.name: c for c in claims.evaluate_claims(report, "lm_v")}
  assert checked["routing"].passed is False
  assert "30.0% of its tokens' top-1, 40.0% of older" in checked["routing"].measured
  assert checked["retention"].passed is None  # no finetune in the report
  assert {c.name: c for c in claims.evaluate_claims(report)}["routing"].passed is True
  summary = claims.method_summary(report, "lm_v")
  assert summary["retention"] == pytest.approx(12.0 / 10.0 - 1)
  assert summary["final_nll"] == pytest.approx((100 * math.log(12.0) + 300 * math.log(20.0)) / 400)
  assert summary["step0_max_old_change"] == pytest.approx(0.005)  # only a is older than b
  assert (summary["new_share"], summary["max_drift"]) == (pytest.approx(0.3), pytest.approx(0.4))
  assert summary["adaptation_gap"] is None and summary["option_overrides"] == {
    "distill_weight": 0.3
  }
  table = claims.method_summary_table(report)
  assert (
    table[-1] == "| lm_v | distill_weight=0.3 | +20.0% | n/a | 2.8680 | +0.5% | 30.0% | 40.0% |"
  )
  # A variant that replays old data (recipe flag) is not a candidate of the old-data-free ranking,
  # even with the best NLL; it is labelled in the table.
  replaying = json.loads(json.dumps(base))
  replaying["spec"] = {"name": "lm_r", "expand": True, "replay": True, "base": "lifelong_moe"}
  for task in ("lifelong_a", "lifelong_b"):
    replaying["phases"][-1]["eval"][task]["loss"] -= 1.0
  other = json.loads(json.dumps(base))
  other["phases"][-1]["eval"]["lifelong_a"]["loss"] += 0.5
  report["methods"] = {"lifelong_moe": base, "lm_r": replaying, "distill_only": other}
  assert claims.uses_old_data(report, "lm_r") and not claims.uses_old_data(report, "lm_v_none")
  assert (
    claims.final_nll_by_method(report)["lm_r"] < claims.final_nll_by_method(report)["lifelong_moe"]
  )
  best = {c.name: c for c in claims.evaluate_claims(report)}["best_without_old_data"]
  assert best.passed is True and "lm_r" not in best.measured
  # A variant of a baseline (a tuned distill_only) is a candidate; a sibling variant is not.
  tuned = json.loads(json.dumps(base))
  tuned["spec"] = {"name": "do_t", "base": "distill_only", "option_overrides": {"x": 1}}
  tuned["phases"][-1]["eval"]["lifelong_a"]["loss"] -= 0.5
  sibling = json.loads(json.dumps(tuned))
  sibling["spec"] = {"name": "lm_s", "base": "lifelong_moe", "option_overrides": {"x": 1}}
  report["methods"].update({"do_t": tuned, "lm_s": sibling})
  best = {c.name: c for c in claims.evaluate_claims(report)}["best_without_old_data"]
  assert best.passed is False and best.measured.startswith("do_t ") and "lm_s" not in best.measured
  report["methods"].pop("do_t")
  best = {c.name: c for c in claims.evaluate_claims(report)}["best_without_old_data"]
  assert best.passed is True and "lm_s" not in best.measured
  assert claims.method_summary_table(report)[3].startswith("| lm_r | replay=True | ")


def test_write_atomic_removes_temporaries_of_killed_writers(tmp_path):
  """A writer killed between mkstemp and rename leaves ``.<name>.<pid>.<x>.tmp``; the next write
  of the same file removes it unless its writer is alive."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from lifelong_moe_jax.lifelong import report_plots  # pylint: disable=import-outside-toplevel

  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  dead_pid = int(dead.stdout)
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    names = {
      "killed": f".fig.png.{dead_pid}.ab12.tmp",
      "older_format": ".fig.png.xrgak601.tmp",
      "live": f".fig.png.{live.pid}.cd34.tmp",
      "other_file": f".other.png.{dead_pid}.ef56.tmp",
    }
    for name in names.values():
      (tmp_path / name).write_bytes(b"partial")
    report_plots.write_atomic(str(tmp_path / "fig.png"), lambda f: f.write(b"png"), binary=True)
    left = sorted(os.listdir(tmp_path))
  finally:
    live.kill()
    live.wait()
  assert left == sorted(["fig.png", names["live"], names["other_file"]])
  assert (tmp_path / "fig.png").read_bytes() == b"png"
