r"""Lifelong pretraining CLI: run a phase schedule for several methods and write the report.

    python -m lifelong_moe_jax.run_lifelong --gin_file=lifelong/demo_cpu.gin \
        --gin.MODEL_DIR=\"./runs/demo\" [--methods lifelong_moe,finetune] [--data_dir ./data]

The schedule file binds ``LifelongSchedule`` (phases, methods, batch, lengths), ``RunnerConfig``,
``MethodOptions``, the model (``include 'models/<name>.gin'``), the optimizer and checkpoint
settings; see docs/lifelong_runner.md. Re-running the same command resumes: complete phases are
skipped, an interrupted phase resumes from its last checkpoint, surgery is never applied twice.
``--report_only`` rebuilds report.json / report.md / PNGs from the finished phases without training;
it refuses a method that has no finished phase yet (naming the methods that have one). With
``--backfill_analysis``, phases finished before the routing analysis and the step-0 evaluation
existed get them first, computed from their checkpoints (``LifelongRunner.backfill_analysis``).
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import report as report_lib
from lifelong_moe_jax.lifelong import runner as runner_lib

flags.DEFINE_list(
  "methods",
  None,
  "Methods to run (overrides LifelongSchedule.methods), e.g. "
  "lifelong_moe,finetune,expand_only,expand_freeze,distill_only,l2,ewc,replay,"
  "multitask,dense_finetune.",
)
flags.DEFINE_boolean("report_only", False, "Only rebuild the report from completed phases.")
flags.DEFINE_boolean(
  "backfill_analysis",
  False,
  "Before the report (or the run), compute the "
  "routing analysis and step-0 evaluation that completed phases lack, from "
  "their checkpoints, and rewrite their phase_result.json.",
)


def build_runner(methods: Sequence[str] | None, data_dir: str | None) -> runner_lib.LifelongRunner:
  """The runner from the parsed gin config (its configuration errors are ValueErrors, which
  ``gin_utils.run`` reports in one line)."""
  return runner_lib.LifelongRunner(
    methods=methods or None, data_dir=data_dir, write_run_config=gin_utils.write_operative_config
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  gin_utils.apply_runtime_flags()
  gin_utils.import_task_modules()
  gin_utils.parse_from_flags()
  gin_utils.check_required_macros()
  runner = build_runner(flags.FLAGS.methods, flags.FLAGS.data_dir)
  if flags.FLAGS.report_only:
    runner.check_methods_ran()  # refuses, before any write, a method without a phase result
  if flags.FLAGS.backfill_analysis:
    updated = runner.backfill_analysis()
    print(f"Backfilled the routing / step-0 analysis of {len(updated)} phase result(s).")
  if flags.FLAGS.report_only:
    report = runner.write_report()
  else:
    report = runner.run()
  print("\n".join(report_lib.comparison_table(report)))
  print(f"\nReport: {runner.model_dir}/{report_lib.REPORT_MD}")


if __name__ == "__main__":
  gin_utils.run(main)
