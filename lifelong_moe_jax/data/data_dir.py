"""Where the prepared corpora live: one resolution rule for every CLI, task and test.

Resolution order (first that is set wins), evaluated each time a path is needed, never frozen at
import time, because CLIs and tests choose the data dir after `import tasks`:

1. an explicit `data_dir` argument;
2. the process-wide override installed by `set_data_dir(...)` or the `using_data_dir(...)` context;
3. the gin binding `configured_data_dir.data_dir = "/path"` (or `= %DATA_DIR`);
4. the environment variable `LIFELONG_MOE_DATA_DIR`;
5. `./data` relative to the current working directory.

The result is always an absolute path. Layout under it (see docs/data.md):
`<dist>/` prepared JSONL shards, `vocab/` the SentencePiece model, `tfds/` the TFDS data dir.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import gin

DATA_DIR_ENV = "LIFELONG_MOE_DATA_DIR"
DEFAULT_DATA_DIR = "./data"

_override: str | None = None


def set_data_dir(data_dir: str | None) -> None:
  """Installs (or, with None, clears) the process-wide data dir override."""
  global _override
  _override = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None


@contextlib.contextmanager
def using_data_dir(data_dir: str | None) -> Iterator[str]:
  """Temporarily overrides the data dir (no-op when `data_dir` is None); yields the resolved dir."""
  global _override
  previous = _override
  if data_dir:
    set_data_dir(data_dir)
  try:
    yield resolve_data_dir()
  finally:
    _override = previous


@gin.configurable(allowlist=["data_dir"])
def configured_data_dir(data_dir: str | None = None) -> str | None:
  """Gin hook: bind `configured_data_dir.data_dir = "/path"` (or a macro) in a .gin file."""
  return data_dir


def resolve_data_dir(data_dir: str | None = None) -> str:
  """Returns the absolute data dir following the resolution order in the module docstring."""
  for candidate in (data_dir, _override, configured_data_dir(), os.environ.get(DATA_DIR_ENV)):
    if candidate:
      return os.path.abspath(os.path.expanduser(str(candidate)))
  return os.path.abspath(DEFAULT_DATA_DIR)


def distribution_dir(name: str, data_dir: str | None = None) -> str:
  """Folder holding the prepared shards of distribution `name`."""
  return os.path.join(resolve_data_dir(data_dir), name)


def vocab_dir(data_dir: str | None = None) -> str:
  """Folder holding the SentencePiece model (`spm.model`) and its marker."""
  return os.path.join(resolve_data_dir(data_dir), "vocab")


def tfds_dir(data_dir: str | None = None) -> str:
  """The TFDS data dir into which the prepared shards are materialised."""
  return os.path.join(resolve_data_dir(data_dir), "tfds")
