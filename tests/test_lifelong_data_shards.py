"""Input shards of evaluation and of the lifelong runner (``data_shards``), in one process.

The 2-process equality of a whole lifelong run is in tests/test_multiprocess.py; here: how an
``Evaluator`` with several shards per process assembles its global batches, and the checks of
``RunnerConfig.data_shards``.
"""

from __future__ import annotations

import numpy as np
import pytest

from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule, ScheduleError
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig

LENGTHS = {"targets": 32}
TASK = "lifelong_code_py"


def test_side_by_side_pads_a_shard_that_ends_first():
  first = iter([{"x": np.array([[1]])}, {"x": np.array([[2]])}])
  second = iter([{"x": np.array([[3]])}])
  template = {"x": np.zeros((1, 1), np.int32)}
  out = [b["x"].tolist() for b in loss_eval._side_by_side([first, second], template)]
  assert out == [[[1], [3]], [[2], [0]]]


def _evaluator(data_dir: str, batch_size: int = 8, data_shards: int | None = 2):
  model = lm.build_model(ModelConfig(num_experts=2, max_length=32), 8000)
  partitioner = pt.Partitioner(pt.create_mesh(pt.MeshConfig(8, 1, 1)))
  return loss_eval.Evaluator(
    model, partitioner, (), LENGTHS, batch_size, data_dir=data_dir, data_shards=data_shards
  )


def test_evaluator_global_batches_are_the_shards_side_by_side(prepared_data_dir):
  """``data_shards=2`` in one process: row block ``s`` of every global batch is shard ``s``'s
  batch of 4 rows (all padding once shard ``s`` is exhausted), as in a 2-process run."""
  batches_iter, template = _evaluator(prepared_data_dir)._dataset(TASK, "validation")
  batches = list(batches_iter)
  shards = [
    list(
      pipeline.get_dataset(
        TASK,
        LENGTHS,
        "validation",
        4,
        shuffle=False,
        seed=0,
        repeat=False,
        pack=True,
        shard_index=s,
        num_shards=2,
        data_dir=prepared_data_dir,
      ).as_numpy_iterator()
    )
    for s in (0, 1)
  ]
  assert batches and len(batches) == max(len(s) for s in shards)
  assert all(v.shape == (8, 32) and not v.any() for v in template.values())
  for i, batch in enumerate(batches):
    for key, rows in batch.items():
      for s, shard in enumerate(shards):
        part = shard[i][key] if i < len(shard) else np.zeros_like(shard[0][key])
        np.testing.assert_array_equal(rows[4 * s : 4 * (s + 1)], part, err_msg=f"{i} {key} {s}")


def test_evaluator_refuses_shards_that_do_not_divide_the_batch(prepared_data_dir):
  with pytest.raises(ValueError, match="Eval batch size 8 is not divisible by data_shards=3"):
    _evaluator(prepared_data_dir, data_shards=3)
  with pytest.raises(ValueError, match="data_shards=0 must be a positive multiple"):
    _evaluator(prepared_data_dir, data_shards=0)


def test_runner_data_shards_are_checked_against_processes_and_batches():
  schedule = LifelongSchedule(
    phases=[{"name": "a", "mixture": TASK, "steps": 2}], batch_size=8, eval_batch_size=4
  )
  assert schedule.resolve_data_shards(None, 1) == 1
  assert schedule.resolve_data_shards(None, 2) == 2
  assert schedule.resolve_data_shards(4, 2) == 4
  with pytest.raises(ScheduleError, match=r"data_shards=3 must be a positive multiple of the 2"):
    schedule.resolve_data_shards(3, 2)
  with pytest.raises(
    ScheduleError, match=r"LifelongSchedule.eval_batch_size=4 is not divisible by RunnerConfig"
  ):
    schedule.resolve_data_shards(8, 1)
