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

flags.DEFINE_string("model_dir", "./runs/demo", "Where the demo run (checkpoints, report) goes.")
flags.DEFINE_list("methods", None, "Methods (default: the schedule's lifelong_moe, finetune).")

DEMO_GIN = "lifelong/demo_cpu.gin"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  f = flags.FLAGS
  gin_utils.apply_runtime_flags()
  # pylint: disable=import-outside-toplevel,unused-import
  import tasks  # noqa: F401  (registers the seqio tasks)
  from lifelong_moe_jax.data import prepare
  from lifelong_moe_jax.lifelong import report as report_lib
  from lifelong_moe_jax.lifelong import runner as runner_lib
  # pylint: enable=import-outside-toplevel,unused-import
  prepare.prepare(data_dir=f.data_dir)
  gin_utils.parse_gin([DEMO_GIN] + list(f.gin_file),
                      [f"MODEL_DIR = {f.model_dir!r}"] + list(f.gin_bindings), f.gin_search_paths)
  runner = runner_lib.LifelongRunner(methods=f.methods or None, data_dir=f.data_dir)
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
  print(f"\nDemo finished in {minutes:.1f} min. Full report: {runner.model_dir}/report.md "
        "(forgetting.png, fewshot.png, expert_usage_<method>.png beside it).")


if __name__ == "__main__":
  gin_utils.run(main)
