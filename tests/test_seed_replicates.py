"""Replicate runs' spread (lifelong/seed_replicates.py, benchmarks/seed_spread.py).

Synthetic reports check the statistics against Python's ``statistics`` module and hand-computed
paired differences; the command line runs on two real tiny lifelong runs (seeds 0 and 1) and its
printed and JSON numbers are checked against values computed here from their report.json."""

import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong import seed_replicates
from tiny_runner import TWO_PHASES, tiny_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["lifelong_a", "lifelong_b"]


def _phases(ppl_a_after_a, ppl_a_end, ppl_b_end, tokens=(100, 300)):
  def ev(pa, pb):
    return {
      t: {"loss": math.log(p), "perplexity": p, "num_tokens": n, "expert_usage": [[0.5, 0.5]]}
      for t, p, n in zip(TASKS, (pa, pb), tokens)
    }

  return [
    {
      "phase_index": 0,
      "phase": "a",
      "num_experts": 2,
      "experts_per_layer": [2],
      "eval": ev(ppl_a_after_a, 90.0),
    },
    {
      "phase_index": 1,
      "phase": "b",
      "num_experts": 2,
      "experts_per_layer": [2],
      "eval": ev(ppl_a_end, ppl_b_end),
    },
  ]


def _report(seed, values):
  """``values``: {method: (ppl_a after A, ppl_a at the end, ppl_b at the end)}."""
  schedule = {
    "phases": [
      {"name": "a", "mixture": "lifelong_a", "steps": 10, "add_experts": 0},
      {"name": "b", "mixture": "lifelong_b", "steps": 10, "add_experts": 0},
    ],
    "methods": list(values),
    "extra_eval_tasks": [],
    "task_feature_lengths": {"targets": 32},
    "batch_size": 8,
    "eval_batch_size": 8,
    "eval_max_batches": 2,
    "seed": seed,
  }
  return report_lib.build_report(
    schedule=schedule,
    model_config={},
    options={},
    eval_tasks=TASKS,
    phase_tasks=[["lifelong_a"], ["lifelong_b"]],
    results={name: _phases(*v) for name, v in values.items()},
  )


RUNS = [
  {"finetune": (10.0, 15.0, 20.0), "distill_only": (10.0, 11.0, 24.0), "lwf2": (10.0, 12.0, 22.0)},
  {"finetune": (12.0, 18.0, 21.0), "distill_only": (12.0, 12.6, 23.0), "lwf2": (12.0, 12.0, 21.5)},
  {"finetune": (11.0, 16.5, 19.0), "distill_only": (11.0, 12.1, 26.0), "lwf2": (11.0, 13.2, 26.5)},
]


def _nll(ppl_a, ppl_b, tokens=(100, 300)):
  return (tokens[0] * math.log(ppl_a) + tokens[1] * math.log(ppl_b)) / sum(tokens)


def test_spreads_and_paired_differences_match_a_hand_count():
  reports = [_report(seed, values) for seed, values in enumerate(RUNS)]
  spreads = seed_replicates.method_spreads(reports)
  assert list(spreads) == ["finetune", "distill_only", "lwf2"]
  for name in spreads:
    retention = [v[name][1] / v[name][0] - 1 for v in RUNS]
    s = spreads[name]["retention"]
    assert s.values == pytest.approx(retention)
    assert s.mean == pytest.approx(statistics.mean(retention))
    assert s.std == pytest.approx(statistics.stdev(retention))
    assert (s.low, s.high) == (pytest.approx(min(retention)), pytest.approx(max(retention)))
    nll = [_nll(v[name][1], v[name][2]) for v in RUNS]
    assert spreads[name]["final_nll"].mean == pytest.approx(statistics.mean(nll))
    gap = [v[name][2] / v["finetune"][2] - 1 for v in RUNS]
    assert spreads[name]["adaptation_gap"].values == pytest.approx(gap)
    assert "new_share" not in spreads[name]  # no expansion, no routing quantities
  paired = seed_replicates.paired_differences(spreads, "distill_only")
  assert set(paired) == {"finetune", "lwf2"}
  diffs = [
    _nll(v["lwf2"][1], v["lwf2"][2]) - _nll(v["distill_only"][1], v["distill_only"][2])
    for v in RUNS
  ]
  assert paired["lwf2"]["difference"].values == pytest.approx(diffs)
  assert paired["lwf2"]["difference"].std == pytest.approx(statistics.stdev(diffs))
  assert paired["lwf2"]["lower_in"] == sum(d < 0 for d in diffs) == 2
  ranks = seed_replicates.nll_ranks(spreads)
  for order, v in zip(ranks, RUNS):
    assert order == sorted(v, key=lambda n: _nll(v[n][1], v[n][2]))
  table = "\n".join(
    seed_replicates.spread_tables(seed_replicates.summarize(reports, "distill_only"))
  )
  assert "Runs: 3 (seeds 0, 1, 2)" in table
  r = [v["lwf2"][1] / v["lwf2"][0] - 1 for v in RUNS]
  assert f"| lwf2 | {100 * statistics.mean(r):+.1f}% ± {100 * statistics.stdev(r):.1f} (" in table


def test_bad_replicates_are_named():
  one = _report(0, RUNS[0])
  with pytest.raises(seed_replicates.ReplicateError, match="at least two"):
    seed_replicates.method_spreads([one])
  other = _report(1, RUNS[1])
  other["phase_tasks"] = [["lifelong_b"], ["lifelong_a"]]
  with pytest.raises(seed_replicates.ReplicateError, match="phase_tasks"):
    seed_replicates.method_spreads([one, other])
  partial = _report(1, RUNS[1])
  partial["methods"]["lwf2"]["complete"] = False
  with pytest.raises(seed_replicates.ReplicateError, match="'lwf2' is not complete in run"):
    seed_replicates.method_spreads([one, partial], ["finetune", "lwf2"])
  assert list(seed_replicates.method_spreads([one, partial])) == ["finetune", "distill_only"]
  with pytest.raises(seed_replicates.ReplicateError, match="reference method 'nope'"):
    seed_replicates.summarize([one, _report(1, RUNS[1])], "nope")


def test_seed_spread_cli_on_two_tiny_runs(tmp_path, prepared_data_dir):
  """benchmarks/seed_spread.py on the report.json of two tiny lifelong runs (seeds 0 and 1)."""
  runs = []
  for seed in (0, 1):
    model_dir = str(tmp_path / f"seed{seed}")
    runner = tiny_runner(
      model_dir,
      prepared_data_dir,
      ["lifelong_moe", "finetune"],
      [
        *TWO_PHASES,
        f"LifelongSchedule.seed = {seed}",
        f"RunnerConfig.compilation_cache_dir = '{tmp_path / 'jax_cache'}'",  # shared: compile once
      ],
    )
    runner.run()
    runs.append(model_dir)
  reports = [report_lib.load_report(r) for r in runs]
  assert [r["schedule"]["seed"] for r in reports] == [0, 1]
  out = str(tmp_path / "spread")
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join("benchmarks", "seed_spread.py"),
      f"--runs={','.join(runs)}",
      "--reference=finetune",
      f"--out={out}",
    ],
    cwd=REPO,
    env=dict(os.environ, NO_GCE_CHECK="true", TF_CPP_MIN_LOG_LEVEL="2"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  tasks = reports[0]["eval_tasks"]

  def final_nll(report, method):
    ev = report["methods"][method]["phases"][-1]["eval"]
    return sum(ev[t]["loss"] * ev[t]["num_tokens"] for t in tasks) / sum(
      ev[t]["num_tokens"] for t in tasks
    )

  nll = {m: [final_nll(r, m) for r in reports] for m in ("lifelong_moe", "finetune")}
  assert nll["lifelong_moe"][0] != nll["lifelong_moe"][1]  # the seed changes the run
  with open(out + ".json", encoding="utf-8") as f:
    payload = json.load(f)
  assert payload["seeds"] == [0, 1]
  got = payload["spreads"]["lifelong_moe"]["final_nll"]
  assert got["values"] == pytest.approx(nll["lifelong_moe"])
  assert got["std"] == pytest.approx(float(np.std(nll["lifelong_moe"], ddof=1)))
  diff = [a - b for a, b in zip(nll["lifelong_moe"], nll["finetune"])]
  paired = payload["paired"]["final_nll"]["lifelong_moe"]
  assert paired["difference"]["mean"] == pytest.approx(sum(diff) / 2)
  assert paired["lower_in"] == sum(d < 0 for d in diff)
  mean = sum(nll["lifelong_moe"]) / 2
  assert "| lifelong_moe | " in proc.stdout and f"{mean:.3f} ± " in proc.stdout, proc.stdout
  assert os.path.getsize(out + ".md") > 0
  with open(out + ".png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # a dir without report.json: one message naming it, before any work
  bad = subprocess.run(
    [sys.executable, "benchmarks/seed_spread.py", f"--runs={runs[0]},{tmp_path / 'none'}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0 and "none/report.json does not exist" in bad.stderr
