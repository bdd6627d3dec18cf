"""``python -m lifelong_moe_jax.eval``: validation loss/perplexity of a checkpoint per task.

The implementation lives in ``lifelong_moe_jax.training.evaluation`` (``eval`` is a package, so
the CLI is this ``__main__``); see docs/training.md.
"""
from lifelong_moe_jax.training import evaluation

if __name__ == "__main__":
  evaluation.console_entry()
