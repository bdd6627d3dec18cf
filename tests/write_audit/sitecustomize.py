"""Test support: logs every file write of this Python process under one folder.

Put this folder on ``PYTHONPATH`` and set ``LIFELONG_MOE_WRITE_AUDIT_ROOT`` (the folder to watch,
e.g. a run's MODEL_DIR) and ``LIFELONG_MOE_WRITE_AUDIT_LOG`` (a folder outside it): every
``open`` for writing (``open``/``io.open``/``os.open`` with write, append, create or truncate
flags) and every rename into the watched folder is appended as one JSON line
``{"pid", "process", "event", "path"}`` to ``<log>/writes.<pid>.jsonl``; ``process`` is the
``--process_index`` of the command line (0 without one). Writes done in C++ (TensorStore array
files, TensorFlow event files) are not seen. ``tests/test_multiprocess.py`` uses it to check
which process writes which file of a lifelong run.
"""

import json
import os
import sys

_ROOT = os.environ.get("LIFELONG_MOE_WRITE_AUDIT_ROOT")
_LOG = os.environ.get("LIFELONG_MOE_WRITE_AUDIT_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install(root: str, log_dir: str) -> None:
  root = os.path.abspath(root) + os.sep
  os.makedirs(log_dir, exist_ok=True)
  out = open(os.path.join(log_dir, f"writes.{os.getpid()}.jsonl"), "a", buffering=1)

  def process_index() -> int:
    for arg in sys.argv:
      if arg.startswith("--process_index="):
        return int(arg.split("=", 1)[1])
    return 0

  def record(event: str, path) -> None:
    if isinstance(path, int):
      return
    try:
      path = os.path.abspath(os.fsdecode(path))
    except TypeError:
      return
    if path.startswith(root):
      line = {"pid": os.getpid(), "process": process_index(), "event": event}
      line["path"] = path[len(root) :]
      out.write(json.dumps(line) + "\n")

  def hook(event: str, args) -> None:
    if event == "open":
      path, _, flags = args
      if isinstance(flags, int) and flags & _WRITE_FLAGS:
        record("open", path)
    elif event == "os.rename":
      record("rename", args[1])

  sys.addaudithook(hook)


if _ROOT and _LOG:
  _install(_ROOT, _LOG)
