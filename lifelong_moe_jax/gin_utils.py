"""Command-line gin handling shared by every CLI (t5x conventions).

* ``--gin_file=PATH`` (repeatable; later files win), looked up in ``--gin_search_paths`` and in
  this repository's ``gin/`` folder;
* ``--gin.NAME=VALUE``: any binding, e.g. ``--gin.TRAIN_STEPS=100`` or
  ``--gin.MODEL_DIR=\\"/tmp/run\\"`` (values are gin literals, so strings need quotes);
* ``--gin_bindings='NAME = VALUE'`` (repeatable) is the long form of the same thing;
* ``--data_dir`` / ``--tfds_data_dir``: where prepared corpora / TFDS datasets live;
* ``--tasks_module=MODULE`` (repeatable or comma-separated, default ``tasks``): the modules that
  register seqio tasks, mixtures and few-shot tasks (t5x's ``MIXTURE_OR_TASK_MODULE``); every CLI
  imports them with ``import_task_modules()`` before parsing gin, so their configurables (e.g.
  ``register_folder_distributions``) can be bound. The library never imports them itself;
* ``--coordinator_address``, ``--process_count``, ``--process_index``: multi-process runs
  (``jax.distributed.initialize``; without them it is still called when the environment is a
  SLURM job, a multi-host TPU slice or Open MPI; see ``distributed.py``).

Run files mark the macros a user must set with ``NAME = %gin.REQUIRED``;
``check_required_macros()`` lists every one still unset in a single error.

Configuration errors (unknown configurable or parameter, bad literal, missing file) become one
``GinConfigError`` naming the binding and the fix, raised before any work starts.

Errors: every CLI runs its ``main`` through ``run``, which reports the project's own errors as one
``error: <message>`` line with exit code 2 (usage) or 1 (runtime); see ``cli_errors.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pathlib
import re
import sys
import tokenize
from typing import Any, Callable, Sequence

from absl import flags
import gin

from lifelong_moe_jax import cli_errors

REPO_GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"
DEFAULT_TASK_MODULES = ("tasks",)

flags.DEFINE_multi_string("gin_file", [], "Gin config files; later files override earlier ones.")
flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings ('NAME = VALUE').")
flags.DEFINE_list("gin_search_paths", [], "Folders searched for --gin_file and gin include paths.")
flags.DEFINE_string(
  "data_dir",
  None,
  "Data dir with the prepared corpora and vocabulary "
  "(default: $LIFELONG_MOE_DATA_DIR, else ./data).",
)
flags.DEFINE_string(
  "tfds_data_dir",
  None,
  "TFDS data dir for tasks that read TFDS datasets (seqio's tfds_data_dir override).",
)
flags.DEFINE_multi_string(
  "tasks_module",
  list(DEFAULT_TASK_MODULES),
  "Python modules that register the seqio tasks and mixtures (and few-shot tasks); repeatable or "
  "comma-separated. Default: this repository's tasks/ package.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("process_count", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_index", None, "This process's index in a multi-process run.")


def _quiet_gin_resource_probe(record: logging.LogRecord) -> bool:
  """gin probes every search path as a Python package and logs each miss as an error; hide them."""
  return not str(record.msg).startswith(
    ("Path not found:", "system_path_file_exists:", "gin-config opened resource")
  )


logging.getLogger().addFilter(_quiet_gin_resource_probe)


class GinConfigError(cli_errors.UsageError):
  """A gin file or binding is invalid."""


def _task_module_names(modules: Sequence[str] | None) -> list[str]:
  if modules is None:
    modules = flags.FLAGS.tasks_module if flags.FLAGS.is_parsed() else list(DEFAULT_TASK_MODULES)
  names = [name.strip() for entry in modules for name in entry.split(",")]
  return list(dict.fromkeys(name for name in names if name))


def import_task_modules(modules: Sequence[str] | None = None) -> list[str]:
  """Imports the task modules (default: ``--tasks_module``, else ``tasks``); returns their names.

  CLIs call this in ``main`` before parsing gin, like t5x imports ``MIXTURE_OR_TASK_MODULE``:
  importing a task module registers its seqio tasks, mixtures and few-shot tasks and defines its
  gin configurables. Errors raised inside a module that was found propagate unchanged.

  Args:
    modules: module names (each entry may hold several, comma-separated); None reads the
      ``--tasks_module`` flag (its default, ``tasks``, when flags are not parsed).

  Raises:
    cli_errors.TaskModuleError: a module (or a package above it) cannot be found; one line naming
      the module and the fix.
  """
  names = _task_module_names(modules)
  for name in names:
    try:
      cli_errors.add_project_source(name)
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      parts = name.split(".")
      if e.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
        raise  # the module exists but one of its own imports is missing
      raise cli_errors.TaskModuleError(
        f"Cannot import task module {name!r} (--tasks_module): module {e.name!r} not found; run "
        "from the repository root (where the default 'tasks' package lives), add the module's "
        "folder to PYTHONPATH, or pass --tasks_module=<your.module>."
      ) from e
  return names


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns ``--gin.NAME=VALUE`` into ``--gin_bindings=NAME = VALUE`` (absl cannot parse dots)."""
  out = []
  for arg in argv:
    m = re.fullmatch(r"--gin\.([^=]+)=(.*)", arg, flags=re.S)
    if m:
      out.append(f"--gin_bindings={m.group(1)} = {m.group(2)}")
    elif re.fullmatch(r"--gin\.[^=]+", arg):
      raise GinConfigError(f"{arg!r} has no value: write --gin.NAME=VALUE.")
    else:
      out.append(arg)
  return out


def search_paths(extra: Sequence[str] = ()) -> list[str]:
  paths = [p for p in extra if p] + [os.getcwd(), str(REPO_GIN_DIR)]
  seen, result = set(), []
  for p in paths:
    if p not in seen:
      seen.add(p)
      result.append(p)
  return result


def _guard_package_resource_reader() -> None:
  """gin's package-resource reader (``gin.resource_reader``) treats ``runs/pretrain.gin`` as file
  ``pretrain.gin`` of a Python package ``runs``; when the working directory holds a plain folder of
  that name (``./runs`` after ``make demo``, ``./data`` after ``make data``), ``find_spec`` returns
  a namespace package without an origin and gin raises ``TypeError`` instead of moving on to the
  search paths. Wraps that existence check so such a folder counts as "not a package resource"."""
  readers = getattr(gin.config, "_FILE_READERS", None)
  if not isinstance(readers, list):
    return
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "_lifelong_guarded", False) or exists is os.path.isfile:
      continue

    def guarded(path, _exists=exists):
      try:
        return _exists(path)
      except TypeError:
        return False

    guarded._lifelong_guarded = True  # pylint: disable=protected-access
    readers[i] = (reader, guarded)


def resolve_gin_file(path: str, gin_search_paths: Sequence[str] = ()) -> str:
  """The absolute path of a gin file given as a path or relative to a search path.

  Raises:
    GinConfigError: not found anywhere.
  """
  if os.path.isfile(path):
    return os.path.abspath(path)
  for folder in search_paths(gin_search_paths):
    candidate = os.path.join(folder, path)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise GinConfigError(
    f"Gin file {path!r} not found (searched {search_paths(gin_search_paths)}); pass a path that "
    "exists or add its folder with --gin_search_paths."
  )


def parse_gin(
  gin_files: Sequence[str],
  bindings: Sequence[str],
  gin_search_paths: Sequence[str] = (),
  *,
  finalize: bool = True,
  skip_unknown: bool = False,
) -> None:
  """Parses gin files then bindings (bindings win), then (``finalize``) checks that no macro is
  left at ``%gin.REQUIRED`` and locks the config.

  Raises:
    GinConfigError: naming the missing file, unknown configurable/parameter or bad value, or
      listing every required macro that was not set.
  """
  _guard_package_resource_reader()
  for path in search_paths(gin_search_paths):
    gin.add_config_file_search_path(path)
  files = [resolve_gin_file(f, gin_search_paths) for f in gin_files]
  try:
    gin.parse_config_files_and_bindings(
      files, list(bindings), finalize_config=False, skip_unknown=skip_unknown
    )
    if finalize:
      check_required_macros()
      gin.finalize()
  except GinConfigError:
    raise
  except (ValueError, KeyError, SyntaxError, IOError, tokenize.TokenError) as e:
    raise GinConfigError(_gin_error_message(e)) from e


_UNBOUND_MACRO = re.compile(r"No bindings specified for '([^'/]+)/gin\.macro'")


def _gin_error_message(e: BaseException) -> str:
  """One line for a gin parse error: gin's message, where it is (file/bindings line) and the fix."""
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  unbound = _UNBOUND_MACRO.search(text)
  if unbound:
    name = unbound.group(1)
    return (
      f"Gin macro %{name} is used but never bound; set it with --gin.{name}=VALUE or bind "
      f"'{name} = VALUE' in a gin file (check its spelling)."
    )
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(e, tokenize.TokenError):  # no location: an unclosed bracket or quote somewhere
    lines = [f"a value is not closed ({e.args[0] if e.args else e}); check brackets and quotes"]
  message, where = (lines[0] if lines else type(e).__name__), ": ".join(lines[1:3])
  where = where[:1].lower() + where[1:]
  return (
    f"Invalid gin configuration: {message.rstrip('.')}{f' ({where})' if where else ''}. "
    "Check the spelling of the configurable and parameter (see the gin/ folder for the "
    "available names) and quote string values (--gin.MODEL_DIR=\\\"/path\\\")."
  )


def parse_from_flags() -> None:
  """Parses the gin flags of the running absl program."""
  parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings, flags.FLAGS.gin_search_paths)


_REQUIRED_MACRO = re.compile(r"^([A-Za-z_][\w./]*) = %gin\.REQUIRED$", flags=re.M)


def missing_required_macros() -> list[str]:
  """Names of gin macros still bound to ``%gin.REQUIRED`` (sorted)."""
  return sorted(set(_REQUIRED_MACRO.findall(gin.config_str())))


def check_required_macros() -> None:
  """Raises one GinConfigError listing every macro still bound to ``%gin.REQUIRED``."""
  missing = missing_required_macros()
  if missing:
    examples = " ".join(f"--gin.{name}=..." for name in missing)
    raise GinConfigError(
      f"Missing required gin macro(s): {', '.join(missing)}. Set each one, e.g. {examples} "
      "(strings quoted: --gin.MODEL_DIR=\\\"/path\\\"), or bind them in a gin file."
    )


def initialize_distributed(
  coordinator_address: str | None = None,
  process_count: int | None = None,
  process_index: int | None = None,
) -> bool:
  """Starts the multi-process runtime (``distributed.initialize``); returns whether it ran.

  With ``--coordinator_address`` (and ``--process_count``/``--process_index``) it uses the flags;
  without them it still starts when the environment is a multi-process one that
  ``jax.distributed.initialize()`` detects (SLURM, multi-host TPU, Open MPI,
  ``$LIFELONG_MOE_DISTRIBUTED=1``). The processes' settings are compared before any work.

  Raises:
    GinConfigError: a coordinator address without process count/index (or the reverse).
    distributed.ProcessMismatchError: the processes disagree (exit code 2).
    distributed.CoordinatorUnreachableError: no coordinator within the timeout (exit code 1).
  """
  from lifelong_moe_jax import distributed  # pylint: disable=import-outside-toplevel

  try:
    return distributed.initialize(coordinator_address, process_count, process_index) is not None
  except distributed.ProcessMismatchError:
    raise
  except ValueError as e:
    raise GinConfigError(str(e)) from e


def apply_runtime_flags() -> None:
  """Applies the data-dir and multi-process flags of the running absl program."""
  f = flags.FLAGS
  if f.data_dir:
    from lifelong_moe_jax.data import data_dir as data_dir_lib  # pylint: disable=import-outside-toplevel

    data_dir_lib.set_data_dir(f.data_dir)
  if f.tfds_data_dir:
    import seqio  # pylint: disable=import-outside-toplevel

    seqio.set_tfds_data_dir_override(f.tfds_data_dir)
  initialize_distributed(f.coordinator_address, f.process_count, f.process_index)


def write_operative_config(model_dir: str, filename: str = "config.gin") -> str:
  """Writes the operative gin config (the bindings actually used) to ``model_dir/filename``."""
  path = os.path.join(model_dir, filename)
  os.makedirs(model_dir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(gin.operative_config_str())
  return path


_QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/seqio/")


class _QuietLibraries:
  """absl log filter: drops INFO records emitted from orbax, tfds and seqio internals."""

  def filter(self, record) -> bool:
    import logging as py_logging  # pylint: disable=import-outside-toplevel

    if record.levelno > py_logging.INFO:
      return True
    return not any(lib in (record.pathname or "") for lib in _QUIET_LIBRARIES)


def quiet_library_logs() -> None:
  """Keeps INFO logs to this package's own lines (progress, eval, checkpoints); library warnings
  and errors still show. Idempotent."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with a one-line ``error:`` and exit code 2 on a bad flag."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    cli_errors.exit_with_error(
      cli_errors.UsageError(f"{e} (see --helpfull for the flags)."), cli_errors.USAGE_EXIT_CODE
    )
    raise  # not reached


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """``absl.app.run`` with ``--gin.NAME=VALUE`` support, an offline-safe environment and the one
  place where every CLI turns the project's own errors into one ``error:`` line (``cli_errors``:
  exit code 2 for usage/config errors, 1 for runtime failures; ``--verbose`` or
  ``$LIFELONG_MOE_VERBOSE=1`` adds the traceback). Other exceptions keep their traceback.
  """
  from absl import app  # pylint: disable=import-outside-toplevel

  os.environ.setdefault("NO_GCE_CHECK", "true")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = rewrite_gin_args(argv)
  except GinConfigError as e:
    cli_errors.exit_with_error(e, cli_errors.USAGE_EXIT_CODE)

  def checked_main(args):
    quiet_library_logs()
    try:
      return main(args)
    except Exception as e:  # pylint: disable=broad-except
      code = cli_errors.exit_code_for(e)
      if code is None:
        raise
      cli_errors.exit_with_error(e, code)

  app.run(checked_main, argv=argv, flags_parser=_parse_flags)
