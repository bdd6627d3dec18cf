"""``python -m lifelong_moe_jax.eval``: evaluate a checkpoint; the gin file chooses the job.

* ``--gin_file=runs/eval.gin`` (with the run's model file): validation loss / perplexity per task,
  ``lifelong_moe_jax.training.evaluation.evaluate_checkpoint`` (docs/training.md);
* ``--gin_file=runs/fewshot.gin``: few-shot scores per task,
  ``lifelong_moe_jax.eval.fewshot.fewshot_checkpoint`` (docs/fewshot.md);
* both files: both jobs, validation loss first.

``eval`` is a package, so the CLI is this ``__main__``.
"""
from __future__ import annotations

from typing import Sequence

import gin

from lifelong_moe_jax import gin_utils

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
  # Everything that registers gin configurables is imported before gin locks the config.
  # pylint: disable=import-outside-toplevel,unused-import
  import tasks  # noqa: F401
  import tasks.fewshot  # noqa: F401
  from lifelong_moe_jax import infer  # noqa: F401  (fewshot_checkpoint loads checkpoints with it)
  from lifelong_moe_jax.eval import fewshot
  from lifelong_moe_jax.training import evaluation
  # pylint: enable=import-outside-toplevel,unused-import
  gin_utils.parse_from_flags()
  jobs = [job for parameter, job in ((LOSS_JOB, evaluation.evaluate_checkpoint),
                                     (FEWSHOT_JOB, fewshot.fewshot_checkpoint))
          if _bound(parameter)]
  if not jobs:
    raise gin_utils.GinConfigError(
        "Nothing to evaluate: pass --gin_file=runs/eval.gin (validation loss, with the run's model "
        "gin file) and/or --gin_file=runs/fewshot.gin (few-shot scores).")
  for job in jobs:
    job()


if __name__ == "__main__":
  gin_utils.run(main)
