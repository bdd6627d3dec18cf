"""Command-line gin handling shared by every CLI (t5x conventions).

* ``--gin_file=PATH`` (repeatable; later files win), looked up in ``--gin_search_paths`` and in
  this repository's ``gin/`` folder;
* ``--gin.NAME=VALUE``: any binding, e.g. ``--gin.TRAIN_STEPS=100`` or
  ``--gin.MODEL_DIR=\\"/tmp/run\\"`` (values are gin literals, so strings need quotes);
* ``--gin_bindings='NAME = VALUE'`` (repeatable) is the long form of the same thing.

Configuration errors (unknown configurable or parameter, bad literal, missing file) become one
``GinConfigError`` naming the binding and the fix, raised before any work starts.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Sequence

from absl import flags
import gin

REPO_GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"

flags.DEFINE_multi_string("gin_file", [], "Gin config files; later files override earlier ones.")
flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings ('NAME = VALUE').")
flags.DEFINE_list("gin_search_paths", [], "Folders searched for --gin_file and gin include paths.")


def _quiet_gin_resource_probe(record: logging.LogRecord) -> bool:
  """gin probes every search path as a Python package and logs each miss as an error; hide them."""
  return not str(record.msg).startswith(("Path not found:", "system_path_file_exists:",
                                         "gin-config opened resource"))


logging.getLogger().addFilter(_quiet_gin_resource_probe)


class GinConfigError(ValueError):
  """A gin file or binding is invalid."""


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


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], gin_search_paths: Sequence[str] = (),
              *, finalize: bool = True, skip_unknown: bool = False) -> None:
  """Parses gin files then bindings (bindings win).

  Raises:
    GinConfigError: naming the missing file, unknown configurable/parameter or bad value.
  """
  for path in search_paths(gin_search_paths):
    gin.add_config_file_search_path(path)
  for f in gin_files:
    if not any(os.path.exists(os.path.join(p, f)) for p in search_paths(gin_search_paths)) \
        and not os.path.exists(f):
      raise GinConfigError(
          f"Gin file {f!r} not found (searched {search_paths(gin_search_paths)}); pass a path that "
          "exists or add its folder with --gin_search_paths.")
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=finalize,
                                        skip_unknown=skip_unknown)
  except (ValueError, KeyError, SyntaxError, IOError) as e:
    raise GinConfigError(
        f"Invalid gin configuration: {e}\nCheck the spelling of the configurable and parameter "
        "(see the gin/ folder for the available names) and quote string values "
        "(--gin.MODEL_DIR=\\\"/path\\\").") from e


def parse_from_flags() -> None:
  """Parses the gin flags of the running absl program."""
  parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings, flags.FLAGS.gin_search_paths)


def run(main, argv: Sequence[str] | None = None) -> None:
  """``absl.app.run`` with ``--gin.NAME=VALUE`` support and offline-safe environment."""
  import sys
  from absl import app
  os.environ.setdefault("NO_GCE_CHECK", "true")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = rewrite_gin_args(argv)
  except GinConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv)
