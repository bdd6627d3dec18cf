"""``train.data_shards``: the global batch is the concatenation of its input shards, whatever the
number of processes that read them (``training.run.resolve_data_shards`` / ``process_dataset``)."""

from __future__ import annotations

import numpy as np
import pytest

from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.training import run


def test_resolve_data_shards():
  assert run.resolve_data_shards(None, 8) == 1  # one process: one shard
  assert run.resolve_data_shards(2, 8) == 2
  with pytest.raises(ValueError, match=r"BATCH_SIZE=6 is not divisible by train.data_shards=4"):
    run.resolve_data_shards(4, 6)
  with pytest.raises(ValueError, match=r"train.data_shards=0 must be a positive multiple"):
    run.resolve_data_shards(0, 8)


def test_one_process_reads_every_shard_in_order(prepared_data_dir):
  lengths = {"targets": 32}
  ds = run.process_dataset(
    "lifelong_wiki_en", lengths, 4, 2, seed=5, pack=True, data_dir=prepared_data_dir
  )
  shards = [
    pipeline.get_dataset(
      "lifelong_wiki_en",
      lengths,
      "train",
      2,
      shuffle=True,
      seed=5,
      repeat=True,
      pack=True,
      shard_index=s,
      num_shards=2,
      data_dir=prepared_data_dir,
    )
    for s in range(2)
  ]
  for batch, *parts in zip(
    ds.take(3).as_numpy_iterator(), *(s.take(3).as_numpy_iterator() for s in shards)
  ):
    for key, value in batch.items():
      assert value.shape[0] == 4
      np.testing.assert_array_equal(value, np.concatenate([p[key] for p in parts]))
