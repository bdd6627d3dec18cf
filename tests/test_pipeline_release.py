"""The training input pipeline is released in a background thread (issue 12's stall)."""

import gc
import time
import weakref

from clu.data import TfDatasetIterator
import tensorflow as tf

from lifelong_moe_jax.training import pipeline_release


class _SlowToDelete:
  """Stands in for a tf.data iterator whose deletion blocks (as it did for 40-50 s in runs)."""

  deleted_in = None

  def __del__(self):
    time.sleep(1.5)
    _SlowToDelete.deleted_in = __import__("threading").current_thread().name


def test_a_slow_deletion_runs_in_the_release_thread_not_the_caller():
  it = TfDatasetIterator(tf.data.Dataset.range(10).map(lambda x: {"x": x}), checkpoint=True)
  assert int(next(it)["x"]) == 0
  it.iterator = _SlowToDelete()
  t0 = time.perf_counter()
  thread = pipeline_release.release_in_background(it)
  it = None
  assert time.perf_counter() - t0 < 1.0  # the caller did not wait for the 1.5 s deletion
  thread.join(10)
  assert not thread.is_alive()
  assert _SlowToDelete.deleted_in == "input-pipeline-release"


def test_the_real_tf_iterator_is_freed_by_the_release():
  it = TfDatasetIterator(
    tf.data.Dataset.range(100).map(lambda x: {"x": x}).prefetch(2), checkpoint=True
  )
  next(it)
  ref = weakref.ref(it.iterator)
  thread = pipeline_release.release_in_background(it)
  assert it.iterator is None
  it = None
  thread.join(30)
  gc.collect()
  assert ref() is None
  assert pipeline_release.release_in_background(iter([1])) is None  # not a tf.data iterator
