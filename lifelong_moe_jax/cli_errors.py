"""How every CLI reports errors: one ``error: <message>`` line and an exit code.

Every CLI runs its ``main`` through ``gin_utils.run``, the one place where the project's own errors
become a single ``error: <message>`` line on stderr (``exit_with_error``), without a traceback; the
exit code comes from ``exit_code_for``:

* exit code 2, usage and configuration errors: bad flags, gin errors (``gin_utils.GinConfigError``,
  a ``UsageError``), missing task modules (``TaskModuleError``) and every ``ValueError`` /
  ``FileNotFoundError`` / ``ImportError`` raised by this package or a task module (settings
  refused by validation before work starts: mesh, top_k, batch, unknown task, unprepared data,
  vocabulary mismatch, missing checkpoint, refused resume, schedule and method errors, surgery
  refusals, ...);
* exit code 1, runtime failures raised by this package or a task module (NaN loss, damaged
  checkpoints, I/O errors);
* anything else (a bug, or an error inside a library that the project did not anticipate) keeps
  Python's traceback.

``--verbose`` (or ``LIFELONG_MOE_VERBOSE=1``) prints the traceback before the ``error:`` line.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys
import traceback
from typing import Any

from absl import flags

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
VERBOSE_ENV = "LIFELONG_MOE_VERBOSE"
USAGE_EXIT_CODE = 2
RUNTIME_EXIT_CODE = 1

flags.DEFINE_boolean(
  "verbose",
  False,
  f"On an error, print the full traceback before the one-line message (also ${VERBOSE_ENV}=1).",
)


class UsageError(ValueError):
  """A command line, configuration or setting that cannot work (exit code 2).

  The base of the CLIs' own usage errors; the message names the problem and the fix.
  """


class TaskModuleError(ImportError):
  """A module named by ``--tasks_module`` cannot be found."""


_PROJECT_SOURCES = [str(PACKAGE_DIR)]  # errors raised from code under these paths are the project's


def add_project_source(module_name: str) -> None:
  """Counts the source of task module ``module_name`` as the project's own (``exit_code_for``)."""
  spec = importlib.util.find_spec(module_name)
  if spec is None or not spec.origin or not os.path.isfile(spec.origin):
    return
  path = os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin
  if path not in _PROJECT_SOURCES:
    _PROJECT_SOURCES.append(path)


_GIN_CALL_CONTEXT = re.compile(r"^\s*In call to configurable ")


def one_line(message: Any) -> str:
  """``message`` on one line: gin's "In call to configurable" context dropped, lines joined."""
  lines = [
    line.strip()
    for line in str(message).splitlines()
    if line.strip() and not _GIN_CALL_CONTEXT.match(line)
  ]
  out = ""
  for line in lines:
    if out:
      out += " " if out[-1] in ".:;,!?" else "; "
    out += line
  return " ".join(out.split())


def _in_project(filename: str | None) -> bool:
  filename = os.path.abspath(filename or "")
  return any(filename == src or filename.startswith(src + os.sep) for src in _PROJECT_SOURCES)


def _raised_by_project(e: BaseException) -> bool:
  """Whether ``e`` is the project's own: its class is defined in this package or a task module,
  or this package or a task module raised it (the innermost frame of its traceback is there)."""
  module = sys.modules.get(type(e).__module__)
  if type(e).__module__.split(".")[0] == __name__.split(".")[0] or (
    module is not None and _in_project(getattr(module, "__file__", None))
  ):
    return True
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return _in_project(tb.tb_frame.f_code.co_filename)


USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)
RUNTIME_ERRORS = (RuntimeError, OSError, ArithmeticError)


def exit_code_for(e: BaseException) -> int | None:
  """The exit code of an error that ``run`` reports in one line, or None (a traceback).

  2 (usage/config): ``UsageError`` (``GinConfigError``), ``TaskModuleError`` and the
  ``USAGE_ERRORS`` types when this package or a task module raised them (validation: bad settings,
  unknown task, unprepared data, vocabulary mismatch, missing checkpoint, refused resume, ...).
  1 (runtime): the ``RUNTIME_ERRORS`` types raised by this package or a task module (NaN loss,
  damaged checkpoint, I/O). None: anything else, e.g. a bug or a library error the project did not
  anticipate, which keeps its traceback.
  """
  if isinstance(e, (UsageError, TaskModuleError)):
    return USAGE_EXIT_CODE
  if not _raised_by_project(e):
    return None
  if isinstance(e, USAGE_ERRORS):
    return USAGE_EXIT_CODE
  if isinstance(e, RUNTIME_ERRORS):
    return RUNTIME_EXIT_CODE
  return None


def verbose() -> bool:
  """``--verbose`` or ``$LIFELONG_MOE_VERBOSE`` (any value but "", "0", "false", "no")."""
  env = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
  return env or (flags.FLAGS.is_parsed() and flags.FLAGS.verbose)


def exit_with_error(e: BaseException, code: int) -> None:
  """Prints ``error: <message>`` (after the traceback when verbose) and exits with ``code``."""
  sys.stdout.flush()
  if verbose():
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
  sys.stderr.write(f"error: {one_line(e)}\n")
  sys.stderr.flush()
  sys.exit(code)
