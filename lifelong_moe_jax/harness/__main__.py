r"""``python -m lifelong_moe_jax.harness``: EleutherAI's lm-evaluation-harness on a checkpoint.

    python -m lifelong_moe_jax.harness --checkpoint runs/demo/lifelong_moe --data_dir ./data \
      --tasks fewshot_polarity_k1,arc_easy --include_path my_tasks/ --num_fewshot 0 \
      --output_path results/

A thin wrapper over the harness's own ``run`` command: it imports ``lifelong_moe_jax.eval.harness``
(which registers the model ``lifelong_moe_jax``), turns its own options into ``--model
lifelong_moe_jax --model_args checkpoint=...,gin_file=...,data_dir=...`` (merged with any
``--model_args`` given) and hands every other argument to the harness unchanged, so every harness
option (``--tasks``, ``--num_fewshot``, ``--include_path``, ``--output_path``, ``--limit``,
``--batch_size``, ``--gen_kwargs``, ``--log_samples``, ...) works as documented there. The harness
writes its results JSON under ``--output_path`` and prints its table.

Own options: ``--checkpoint DIR`` (required: step dir or MODEL_DIR), ``--gin_file F`` (repeatable:
mesh, vocabulary, model for checkpoints without a stored config), ``--data_dir DIR`` (where the
vocabulary is). Runs offline: ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` unless set.
Errors of this project (missing extra, missing checkpoint, wrong vocabulary, checkpoint of another
model) end the run with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

OWN_OPTIONS = {"--checkpoint": "checkpoint", "--gin_file": "gin_file", "--data_dir": "data_dir"}
MODEL_NAME = "lifelong_moe_jax"


class HarnessUsageError(ValueError):
  """Bad command line of the wrapper."""


def split_args(argv: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
  """(own options ``{name: [values]}``, the arguments for the harness) of ``argv`` (no program)."""
  own: dict[str, list[str]] = {}
  rest: list[str] = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    flag, eq, value = arg.partition("=")
    if flag in OWN_OPTIONS:
      if not eq:
        if i + 1 >= len(argv):
          raise HarnessUsageError(f"{flag} needs a value.")
        value = argv[i + 1]
        i += 1
      own.setdefault(OWN_OPTIONS[flag], []).append(value)
    else:
      rest.append(arg)
    i += 1
  return own, rest


def harness_argv(own: dict[str, list[str]], rest: Sequence[str]) -> list[str]:
  """The harness ``run`` command line: ``--model lifelong_moe_jax --model_args ...`` + ``rest``."""
  if not own.get("checkpoint"):
    raise HarnessUsageError("--checkpoint DIR is required (a checkpoint step dir or a MODEL_DIR).")
  rest = list(rest)
  user_args = ""
  for flag in ("--model", "--model_args"):
    for i, arg in enumerate(rest):
      name, eq, value = arg.partition("=")
      if name == flag:
        if not eq:
          if i + 1 >= len(rest):
            raise HarnessUsageError(f"{flag} needs a value.")
          value = rest.pop(i + 1)
        rest.pop(i)
        if flag == "--model" and value != MODEL_NAME:
          raise HarnessUsageError(
            f"This wrapper runs the model {MODEL_NAME!r}, not {value!r}; "
            "use lm-eval directly for other models."
          )
        if flag == "--model_args":
          user_args = value
        break
  parts = [f"checkpoint={os.path.abspath(own['checkpoint'][-1])}"]
  if own.get("gin_file"):
    parts.append("gin_file=" + "+".join(own["gin_file"]))
  if own.get("data_dir"):
    parts.append(f"data_dir={os.path.abspath(own['data_dir'][-1])}")
  model_args = ",".join(parts + ([user_args] if user_args else []))
  return ["run", "--model", MODEL_NAME, "--model_args", model_args, *rest]


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the harness (see module docstring); project errors become one ``error:`` line."""
  for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(name, "1")
  os.environ.setdefault("NO_GCE_CHECK", "true")
  argv = list(sys.argv[1:] if argv is None else argv)
  from lifelong_moe_jax import cli_errors  # pylint: disable=import-outside-toplevel

  try:
    from lifelong_moe_jax.eval import harness  # pylint: disable=import-outside-toplevel

    harness.require_harness()
    if any(a in ("-h", "--help") for a in argv):
      print(__doc__)
      return
    own, rest = split_args(argv)
    command = harness_argv(own, rest)
    from lm_eval._cli import HarnessCLI  # pylint: disable=import-outside-toplevel
    from lm_eval.utils import setup_logging  # pylint: disable=import-outside-toplevel

    setup_logging()
    sys.argv = ["lm-eval", *command]
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
  except HarnessUsageError as e:
    cli_errors.exit_with_error(e, cli_errors.USAGE_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    code = cli_errors.exit_code_for(e)
    if code is None:
      raise
    cli_errors.exit_with_error(e, code)


if __name__ == "__main__":
  main()
