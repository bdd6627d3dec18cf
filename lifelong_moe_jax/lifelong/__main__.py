r"""Lifelong pretraining CLI: run a phase schedule for several methods and write the report.

    python -m lifelong_moe_jax.lifelong --gin_file=lifelong/demo_cpu.gin \
        --gin.MODEL_DIR=\"./runs/demo\" [--methods lifelong_moe,finetune] [--data_dir ./data]

The schedule file binds ``LifelongSchedule`` (phases, methods, batch, lengths), the model
(``include 'models/<name>.gin'``), the optimizer and checkpoint settings; see
docs/lifelong_runner.md. Re-running the same command resumes: complete phases are skipped, an
interrupted phase resumes from its last checkpoint, surgery is never applied twice.
``--report_only`` rebuilds report.json / report.md / PNGs from the finished phases without training.
"""
from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from lifelong_moe_jax import gin_utils

flags.DEFINE_list("methods", None, "Methods to run (overrides LifelongSchedule.methods), e.g. "
                  "lifelong_moe,finetune,expand_only,expand_freeze,distill_only,l2,ewc,replay,"
                  "multitask,dense_finetune.")
flags.DEFINE_boolean("report_only", False, "Only rebuild the report from completed phases.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  gin_utils.apply_runtime_flags()
  # pylint: disable=import-outside-toplevel,unused-import
  import tasks  # noqa: F401  (registers the seqio tasks)
  from lifelong_moe_jax.lifelong import baselines  # noqa: F401  (gin configurables)
  from lifelong_moe_jax.lifelong import report as report_lib
  from lifelong_moe_jax.lifelong import runner as runner_lib
  from lifelong_moe_jax.lifelong import schedule  # noqa: F401
  # pylint: enable=import-outside-toplevel,unused-import
  gin_utils.parse_from_flags()
  gin_utils.check_required_macros()
  try:   # configuration errors: one line, before any work
    runner = runner_lib.LifelongRunner(methods=flags.FLAGS.methods or None,
                                       data_dir=flags.FLAGS.data_dir)
  except ValueError as e:
    sys.exit(f"error: {e}")
  report = runner.write_report() if flags.FLAGS.report_only else runner.run()
  print("\n".join(report_lib.comparison_table(report)))
  print(f"\nReport: {runner.model_dir}/{report_lib.REPORT_MD}")


if __name__ == "__main__":
  gin_utils.run(main)
