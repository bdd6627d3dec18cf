r"""The issue-11 study behind ``make study``: A = wiki_en -> B = fortunes_intl -> C = dialog_en.

    python -m lifelong_moe_jax.study --data_dir ./data_study --model_dir ./runs/study \
        [--methods lifelong_moe,finetune] [--gin.PHASE_A_STEPS=1500]

1. checks that the Debian fortunes packages behind ``fortunes_intl`` are installed (one line with the
   ``apt-get install`` command otherwise, before anything is written);
2. prepares the four distributions and their vocabulary in ``--data_dir`` (a separate data dir, so
   the default one and the demo are unchanged);
3. runs ``gin/lifelong/study_cpu.gin`` with the lifelong runner in ``--model_dir`` (re-running
   resumes; extra ``--gin_file`` / ``--gin.NAME=VALUE`` flags apply after the schedule);
4. prints the comparison table and the claims table (``lifelong.claims``) and writes it to
   ``<model_dir>/claims.md`` and ``claims.json``.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import flags

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import run_lifelong
from lifelong_moe_jax.data import prepare
from lifelong_moe_jax.data import sources
from lifelong_moe_jax.lifelong import claims as claims_lib
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import report as report_lib

flags.DEFINE_string("model_dir", "./runs/study", "Where the study run (checkpoints, report) goes.")
flags.DEFINE_string(
  "claims_method",
  "lifelong_moe",
  "The method (lifelong_moe or one of its RunnerConfig.method_variants) the claims are checked for.",
)

STUDY_GIN = "lifelong/study_cpu.gin"
DISTRIBUTIONS = ("wiki_en", "code_py", "dialog_en", "fortunes_intl")


def write_claims(model_dir: str, report: dict, method: str = "lifelong_moe") -> list[str]:
  """Evaluates the claims for ``method`` on ``report``; writes ``claims.md`` (claims and the
  per-method sweep table) and ``claims.json``; returns the claims table lines."""
  checked = claims_lib.evaluate_claims(report, method)
  table = claims_lib.claims_table(checked)
  summaries = [claims_lib.method_summary(report, m) for m in report["methods"]]
  phase_results.write_json_atomic(
    os.path.join(model_dir, "claims.json"),
    {
      "method": method,
      "claims": [c.to_dict() for c in checked],
      "methods": [s for s in summaries if s is not None],
    },
  )
  tmp = os.path.join(model_dir, "claims.md.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(
      f"# Lifelong-MoE claims on this run ({method})\n\n"
      + "\n".join(table)
      + "\n\n## Every method\n\n"
      + "\n".join(claims_lib.method_summary_table(report))
      + "\n"
    )
  os.replace(tmp, os.path.join(model_dir, "claims.md"))
  return table


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  f = flags.FLAGS
  try:
    sources.fortune_files()
  except sources.MissingDebianPackagesError as e:
    raise gin_utils.GinConfigError(
      f"The study's phase B (fortunes_intl) cannot be built: {e}"
    ) from e
  gin_utils.apply_runtime_flags()
  prepare.prepare(data_dir=f.data_dir, distributions=DISTRIBUTIONS)
  gin_utils.import_task_modules()
  gin_utils.parse_gin(
    [STUDY_GIN] + list(f.gin_file),
    [f"MODEL_DIR = {f.model_dir!r}"] + list(f.gin_bindings),
    f.gin_search_paths,
  )
  runner = run_lifelong.build_runner(f.methods, f.data_dir)
  if f.claims_method not in runner.methods:
    raise gin_utils.GinConfigError(
      f"--claims_method={f.claims_method} is not among the study's methods "
      f"({', '.join(runner.methods)}); pass one of them."
    )
  runner.run()
  # Phases finished by an older version of the runner get their routing / step-0 entries now.
  runner.backfill_analysis()
  report = runner.write_report()
  print("\n## Comparison after the last phase\n")
  print("\n".join(report_lib.comparison_table(report)))
  print("\n## Claims\n")
  print("\n".join(write_claims(runner.model_dir, report, f.claims_method)))
  print(
    f"\nStudy finished in {(time.perf_counter() - start) / 60:.1f} min. Report: "
    f"{runner.model_dir}/report.md, claims: {runner.model_dir}/claims.md"
  )


if __name__ == "__main__":
  gin_utils.run(main)
