"""``python -m lifelong_moe_jax.evaluate``: evaluate a checkpoint; the gin file chooses the job.

* ``--gin_file=runs/eval.gin`` (with the run's model file): validation loss / perplexity per task,
  ``lifelong_moe_jax.training.loss_eval.evaluate_checkpoint`` (docs/training.md);
* ``--gin_file=runs/fewshot.gin``: few-shot scores per task,
  ``lifelong_moe_jax.eval.fewshot.fewshot_checkpoint`` (docs/fewshot.md);
* both files: both jobs, validation loss first.

Both jobs are library functions; this CLI registers them with gin (``evaluate_checkpoint.*``,
``fewshot_checkpoint.*``), imports the task modules (``--tasks_module``) and runs what is bound.
"""

from __future__ import annotations

from typing import Sequence

import gin

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.eval import fewshot
from lifelong_moe_jax.eval import loss_eval

LOSS_JOB = "evaluate_checkpoint.model_dir"
FEWSHOT_JOB = "fewshot_checkpoint.checkpoint_path"


def _bound(parameter: str) -> bool:
  try:
    gin.query_parameter(parameter)
  except ValueError:
    return False
  return True


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  gin_utils.apply_runtime_flags()
  gin_utils.import_task_modules()
  loss_job = gin.external_configurable(loss_eval.evaluate_checkpoint, "evaluate_checkpoint")
  fewshot_job = gin.external_configurable(fewshot.fewshot_checkpoint, "fewshot_checkpoint")
  gin_utils.parse_from_flags()
  jobs = [
    job
    for parameter, job in ((LOSS_JOB, loss_job), (FEWSHOT_JOB, fewshot_job))
    if _bound(parameter)
  ]
  if not jobs:
    raise gin_utils.GinConfigError(
      "Nothing to evaluate: pass --gin_file=runs/eval.gin (validation loss, with the run's model "
      "gin file) and/or --gin_file=runs/fewshot.gin (few-shot scores)."
    )
  for job in jobs:
    job()


if __name__ == "__main__":
  gin_utils.run(main)
