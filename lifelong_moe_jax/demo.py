r"""The CPU demo behind ``make demo``: Lifelong-MoE vs fine-tuning on wiki_en -> code_py -> dialog_en.

    python -m lifelong_moe_jax.demo --data_dir ./data --model_dir ./runs/demo [--gin.STEPS_PER_PHASE=50]

1. prepares the default corpora and vocabulary if needed (idempotent, seconds when already built);
2. runs ``gin/lifelong/demo_cpu.gin`` (demo model, 3 phases, lifelong_moe and finetune) with the
   lifelong runner in ``--model_dir`` (re-running resumes or just reprints the report);
3. prints the headline, comparison and few-shot tables (4 embedded tasks scored zero-shot after
   every phase); the full report is ``<model_dir>/report.md``.

Extra ``--gin_file`` / ``--gin.NAME=VALUE`` flags are applied after the demo schedule.
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import flags

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import run_lifelong
from lifelong_moe_jax.data import prepare
from lifelong_moe_jax.lifelong import analysis_report
from lifelong_moe_jax.lifelong import report as report_lib

flags.DEFINE_string("model_dir", "./runs/demo", "Where the demo run (checkpoints, report) goes.")

DEMO_GIN = "lifelong/demo_cpu.gin"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  f = flags.FLAGS
  gin_utils.apply_runtime_flags()
  prepare.prepare(data_dir=f.data_dir)
  gin_utils.import_task_modules()
  gin_utils.parse_gin(
    [DEMO_GIN] + list(f.gin_file),
    [f"MODEL_DIR = {f.model_dir!r}"] + list(f.gin_bindings),
    f.gin_search_paths,
  )
  runner = run_lifelong.build_runner(f.methods, f.data_dir)
  report = runner.run()
  minutes = (time.perf_counter() - start) / 60
  print("\n## Headline (validation perplexity; lower is better)\n")
  print("\n".join(report_lib.headline_table(report)))
  print("\n## Comparison after the last phase\n")
  print("\n".join(report_lib.comparison_table(report)))
  fewshot = report_lib.fewshot_table(report)
  if fewshot:
    print("\n## Few-shot scores after each phase (percent, higher is better; chance beside)\n")
    print("\n".join(fewshot))
  for title, table in (
    ("Right after expansion (step 0 of each phase)", analysis_report.step0_table(report)),
    (
      "Routing by owning phase (% of top-1 / top-k assignments)",
      analysis_report.routing_table(report),
    ),
  ):
    if table:
      print(f"\n## {title}\n")
      print("\n".join(table))
  print(
    f"\nDemo finished in {minutes:.1f} min. Full report: {runner.model_dir}/report.md "
    "(forgetting.png, fewshot.png, routing.png, expert_usage_<method>.png beside it)."
  )


if __name__ == "__main__":
  gin_utils.run(main)
