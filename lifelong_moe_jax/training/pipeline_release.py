"""Releasing a finished training's input pipeline without blocking the caller.

Deleting a tf.data iterator cancels the pipeline and joins its threads. After the last step of a
phase this sometimes blocked ``training.run.train_model`` for 40-50 s with nothing logged (issue 12;
measured in the demo and the study, once in a standalone loop; docs/performance.md), so
the runner's next line (the phase evaluation) waited for it. ``release_in_background`` moves the
deletion to a daemon thread; the process waits for such threads (at most 2 minutes) at exit.
"""

from __future__ import annotations

import atexit
import gc
import threading
import time
from typing import Any

from absl import logging
from clu.data import TfDatasetIterator

_RELEASE_THREADS: list[threading.Thread] = []
_RELEASE_JOIN_S = 120.0
_LOG_ABOVE_S = 5.0
_joined_at_exit = False


def _join_release_threads() -> None:
  """At exit: wait (bounded) for pipelines still being released, so TF is not torn down under
  them."""
  deadline = time.perf_counter() + _RELEASE_JOIN_S
  for thread in list(_RELEASE_THREADS):
    thread.join(max(0.0, deadline - time.perf_counter()))


def release_in_background(data_iter: Any) -> threading.Thread | None:
  """Drops the last reference to a training input iterator in a daemon thread; returns it.

  A ``clu`` ``TfDatasetIterator`` is emptied first (its tf.data iterator and the
  ``tf.train.Checkpoint`` that tracks it), so the iterator's deletion, which cancels and joins the
  pipeline's threads, runs in the release thread instead of the caller's. The caller must drop its
  own references to the iterator and dataset right after. The release time is logged when it
  took over 5 s. The process waits (at most 2 minutes) for release threads at exit.
  """
  if not isinstance(data_iter, TfDatasetIterator):
    return None
  holder = [data_iter.iterator, data_iter._ckpt]  # pylint: disable=protected-access
  data_iter.iterator = data_iter._ckpt = None  # pylint: disable=protected-access

  def release() -> None:
    t0 = time.perf_counter()
    holder.clear()
    gc.collect()  # TF objects caught in reference cycles are freed here too, not in the caller
    elapsed = time.perf_counter() - t0
    if elapsed > _LOG_ABOVE_S:
      logging.info("Input pipeline of the finished training released in %.1f s.", elapsed)

  global _joined_at_exit
  if not _joined_at_exit:
    atexit.register(_join_release_threads)
    _joined_at_exit = True
  _RELEASE_THREADS[:] = [t for t in _RELEASE_THREADS if t.is_alive()]
  thread = threading.Thread(target=release, name="input-pipeline-release", daemon=True)
  _RELEASE_THREADS.append(thread)
  thread.start()
  return thread
