"""Start-up of a ``python -m lifelong_moe_jax.<cli>`` process: environment and a quiet TensorFlow.

TensorFlow (imported by seqio, so by every CLI that reads data or checkpoints) writes C++ INFO and
WARNING lines to stderr while it is imported and its devices start (oneDNN, "Could not find cuda
drivers", "All log messages before absl::InitializeLog() ...", CPU features, a failed cuInit on a
machine without GPU), whatever ``TF_CPP_MIN_LOG_LEVEL`` says. On an error path a CLI's stderr
should hold exactly one ``error:`` line (``gin_utils.run``), so the package's ``__init__`` calls
``prepare_cli_process`` when it is imported by ``python -m lifelong_moe_jax.<cli>``: TensorFlow is
imported (and kept off the GPUs, which JAX owns) with stderr captured, and everything it wrote
except those lines is written back (errors and Python warnings still show); SentencePiece's C++
INFO lines are turned off. Library imports (tests, notebooks) are untouched.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# ``python -m lifelong_moe_jax.<module>`` programs that do not import TensorFlow (every other one
# does, through seqio).
NO_TF_CLIS = frozenset({"lifelong_moe_jax.model_info"})
ENVIRONMENT_DEFAULTS = {"NO_GCE_CHECK": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\] ")
_NOISE = re.compile(
  r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
  r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\] .*"
  # TF probing for a GPU it is not allowed to use (set_visible_devices below) on a CPU machine.
  r"|E\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*)$"
)
_NOT_CONTINUATION = re.compile(r"^(Traceback|\S+\.py:\d+: \w*Warning)")


_OPTIONS_WITH_VALUE = frozenset({"-X", "-W", "--check-hash-based-pycs"})


def cli_module(orig_argv: list[str] | None = None) -> str | None:
  """The module of ``python [options] -m MODULE ...`` (``sys.orig_argv``), else None."""
  argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg == "-m":
      return argv[i + 1] if i + 1 < len(argv) else None
    if arg.startswith("-m"):
      return arg[2:]
    if arg in _OPTIONS_WITH_VALUE:
      i += 2
      continue
    if not arg.startswith("-") or arg == "-" or arg.startswith("-c"):
      return None  # a script, stdin or a -c program
    i += 1
  return None


def filter_noise(text: str) -> str:
  """``text`` without TensorFlow's start-up C++ INFO/WARNING lines (and their continuations)."""
  kept, dropping = [], False
  for line in text.splitlines(keepends=True):
    bare = line.rstrip("\n")
    if _NOISE.match(bare):
      dropping = True
    elif _LOG_LINE.match(bare) or _NOT_CONTINUATION.match(bare):
      dropping = False
      kept.append(line)
    elif not dropping:
      kept.append(line)
  return "".join(kept)


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with stderr (fd 2) captured, then writes back all but the noise lines."""
  if "tensorflow" in sys.modules:
    return
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

    return  # no file descriptor 2 to capture
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel

      # TF only runs input pipelines here: keep it off the GPUs (JAX owns them, as in t5x). This
      # also initialises TF's devices now, inside the capture (cuInit, CPU-feature lines).
      try:
        tf.config.set_visible_devices([], "GPU")
      except RuntimeError:  # devices already initialised: nothing to hide any more
        pass
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = filter_noise(captured.read().decode("utf-8", errors="replace"))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def prepare_cli_process() -> None:
  """Environment defaults and a quiet TensorFlow import for ``python -m lifelong_moe_jax.<cli>``
  (except NO_TF_CLIS)."""
  module = cli_module()
  if module is None or module.split(".")[0] != __name__.split(".")[0] or module in NO_TF_CLIS:
    return
  for key, value in ENVIRONMENT_DEFAULTS.items():
    os.environ.setdefault(key, value)
  import_tensorflow_quietly()
  quiet_sentencepiece()


def quiet_sentencepiece() -> None:
  """Keeps SentencePiece's C++ INFO lines ("precompiled_charsmap is empty ...") off stderr."""
  try:
    import sentencepiece  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  if hasattr(sentencepiece, "set_min_log_level"):
    sentencepiece.set_min_log_level(1)  # 0 INFO, 1 WARNING, 2 ERROR
