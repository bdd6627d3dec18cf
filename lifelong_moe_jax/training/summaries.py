"""Turning step metrics into named scalars and writing them (TensorBoard + JSONL + progress log).

Scalar names (train):

==============================  ===============================================================
``loss``                        total loss (model loss + regularizer terms)
``model_loss``                  cross-entropy + weighted aux and z losses
``cross_entropy``, ``accuracy``  per target token
``aux_loss``, ``z_loss``        router losses, means over MoE layers (unweighted)
``num_tokens``                  weighted target tokens in the batch
``learning_rate``, ``grad_norm``  schedule value and global gradient norm (before clipping)
``moe/layer_L/expert_E_fraction``  fraction of layer L's routing assignments taken by expert E
``moe/layer_L/dropped_fraction``  fraction of layer L's assignments dropped for capacity
``moe/layer_L/aux_loss`` etc.   per-layer router losses (L is the decoder layer index)
``reg/<name>/...``              regularizer terms and their metrics
``tokens_per_second``           global batch positions processed per second (host wall clock)
``step_time``                   seconds per step (host wall clock, averaged over the window)
==============================  ===============================================================

Values logged at step ``s`` are means over the steps since the previous summary.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
from clu import metric_writers
import numpy as np

MOE_LAYER_STATS = ("aux_loss", "z_loss", "dropped_fraction")


def moe_layer_indices(config: Any) -> list[int]:
  """Decoder layer indices holding an MoE block (the ``L`` in ``moe/layer_L/...``)."""
  return [i for i in range(config.num_layers) if config.is_moe_layer(i)]


def flatten_step_metrics(
  metrics: Mapping[str, Any], layer_indices: Sequence[int]
) -> dict[str, float]:
  """Host-side step metrics (numpy) -> flat ``{name: float}`` (names in the module docstring).

  Args:
    metrics: scalars plus an optional ``moe`` dict of ``[M]`` / ``[M, E]`` arrays.
    layer_indices: decoder layer index of each of the M MoE layers.
  """
  out: dict[str, float] = {}
  for name, value in metrics.items():
    if name == "moe":
      continue
    out[name] = float(np.asarray(value))
  moe = metrics.get("moe")
  if moe:
    for m, layer in enumerate(layer_indices):
      prefix = f"moe/layer_{layer}"
      for e, frac in enumerate(np.asarray(moe["expert_fraction"][m]).tolist()):
        out[f"{prefix}/expert_{e}_fraction"] = float(frac)
      for stat in MOE_LAYER_STATS:
        out[f"{prefix}/{stat}"] = float(np.asarray(moe[stat][m]))
  return out


def mean_metrics(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Per-name mean over a window of flattened step metrics."""
  if not records:
    return {}
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def first_non_finite(
  records: Iterable[tuple[int, Mapping[str, float]]], names: Sequence[str] = ("loss", "grad_norm")
) -> tuple[int, str, float] | None:
  """The first ``(step, name, value)`` whose loss or grad norm is NaN/Inf, else None."""
  for step, record in records:
    for name in names:
      if name in record and not math.isfinite(record[name]):
        return step, name, record[name]
  return None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, train_steps: int, scalars: Mapping[str, float]) -> str:
  """``step 120/1000 | loss 4.1234 | 12,345 tokens/s | 0.052 s/step | ETA 0m45s``."""
  eta = (train_steps - step) * scalars.get("step_time", 0.0)
  return (
    f"step {step}/{train_steps} | loss {scalars.get('loss', float('nan')):.4f} | "
    f"{scalars.get('tokens_per_second', 0.0):,.0f} tokens/s | "
    f"{scalars.get('step_time', 0.0):.3f} s/step | ETA {format_duration(eta)}"
  )


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl file; a torn last line (killed writer) is skipped."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


class MetricsWriter:
  """Writes scalars as TensorBoard events (clu) and as JSON lines, in one folder.

  Only the process given ``enabled=True`` (process 0) writes; others are no-ops, so every process
  can call it. ``logdir/metrics.jsonl`` holds one ``{"step": s, name: value, ...}`` per write.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, jsonl_name: str = "metrics.jsonl"):
    self.logdir = logdir
    self.enabled = enabled
    self.jsonl_path = os.path.join(logdir, jsonl_name)
    self._writer = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      self._writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))

  def truncate_after(self, step: int) -> None:
    """Drops JSONL records with ``step > step`` (written by a run that was lost before its next
    checkpoint), so the file describes the resumed run's history."""
    if not self.enabled or not os.path.exists(self.jsonl_path):
      return
    kept = [r for r in read_jsonl(self.jsonl_path) if int(r.get("step", 0)) <= step]
    tmp = self.jsonl_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in kept:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, self.jsonl_path)

  def write_scalars(
    self, step: int, scalars: Mapping[str, float], extra: Mapping[str, Any] | None = None
  ) -> None:
    """Writes ``scalars`` at ``step`` to TensorBoard and appends them (plus ``extra``) to JSONL."""
    if not self.enabled:
      return
    self._writer.write_scalars(step, dict(scalars))
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}, **(extra or {})}
    with open(self.jsonl_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class WindowTimer:
  """Wall-clock time and step count since the last summary (for tokens/s and step time)."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.start = time.perf_counter()
    self.steps = 0

  def tick(self) -> None:
    self.steps += 1

  def rates(self, tokens_per_step: int) -> dict[str, float]:
    elapsed = time.perf_counter() - self.start
    steps = max(self.steps, 1)
    return {
      "step_time": elapsed / steps,
      "tokens_per_second": tokens_per_step * steps / max(elapsed, 1e-9),
    }


def log_info(message: str, *args) -> None:
  """absl INFO on process 0 only (avoids N copies of every progress line on a pod)."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_index() == 0:
    logging.info(message, *args)
