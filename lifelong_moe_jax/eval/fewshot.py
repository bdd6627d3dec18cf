"""k-shot evaluation: rank classification and generation over registered few-shot tasks.

    results = run_fewshot(model, params, vocabulary, ["fewshot_polarity"], k=1, max_examples=100)
    results["fewshot_polarity"] == {"accuracy": 61.0, "accuracy_norm": 58.0, "chance": 50.0,
                                    "num_examples": 100}

Multiple choice: every (question, choice) row is tokenized with ``prompts.encode_pair``; rows that
share their prompt tokens share one prefill of the KV cache (``decoding.score_continuations``), so a
k-shot prompt is run once per question, not once per choice. Generation: greedy decoding of
``task.max_decode_len`` tokens, stopping at EOS or at the task's stop string (a newline) when it is
a single token. Both use no-drop expert capacity (see ``decoding``), so a question's score does
not depend on the other questions in its batch.

Prompts longer than the model's ``max_length`` (minus the continuation or decode budget) are cut
from the left, i.e. the first demonstrations go first. All batches of a task share one shape (the
longest prompt and continuation, rounded up to a power of two), so a task compiles once and later
calls with the same model config (e.g. after every lifelong phase) reuse the compilation.

CLI (a checkpoint, see docs/fewshot.md; ``fewshot_checkpoint``)::

    python -m lifelong_moe_jax.eval --gin_file=runs/fewshot.gin \\
      --gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.OUTPUT_DIR=\\"/tmp/run/fewshot\\"

writes ``OUTPUT_DIR/fewshot-k<k>.json`` (the results dict) and ``OUTPUT_DIR/<task>-k<k>.jsonl``
(one line per question: prompt, choices or answers, scores or prediction, correctness).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import gin
import numpy as np
import seqio

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import decoding
from lifelong_moe_jax import distributed
from lifelong_moe_jax.eval import metrics as metrics_lib
from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.models.lm import LanguageModel

DEFAULT_MAX_EXAMPLES = 100
DEFAULT_BATCH_SIZE = 16
_MIN_PREFIX_BUCKET = 16
_MIN_CONTINUATION_BUCKET = 4


def _bucket(n: int, minimum: int) -> int:
  """Smallest power of two >= max(n, minimum)."""
  size = minimum
  while size < n:
    size *= 2
  return size


def stop_token_id(vocabulary: seqio.Vocabulary, stop: str) -> int | None:
  """The id of ``stop`` when the vocabulary encodes it as one token after a word, else None."""
  if not stop:
    return None
  base = list(vocabulary.encode("a"))
  ids = list(vocabulary.encode("a" + stop))
  if ids[: len(base)] != base or len(ids) != len(base) + 1:
    return None
  return ids[-1] if vocabulary.decode([ids[-1]]) == stop else None


# ------------------------------------------------------------------------------------ scoring
def score_pairs(
  model: LanguageModel,
  params: Any,
  pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
  *,
  batch_size: int = DEFAULT_BATCH_SIZE,
  group_size: int | None = None,
) -> tuple[np.ndarray, int]:
  """Summed log-likelihood of each continuation given its prefix.

  Args:
    model: the LanguageModel.
    params: unboxed params.
    pairs: (prefix ids, continuation ids) per row; rows with identical prefixes share a prefill.
      Continuations must be non-empty.
    batch_size: prefixes per compiled call.
    group_size: routing group size override (memory only).
  Returns:
    (float64 [num_rows] scores, number of prefixes cut from the left to fit ``max_length``).
  """
  max_length = model.config.max_length
  prefix_ids: dict[tuple[int, ...], int] = {}
  rows_of: list[list[int]] = []
  for r, (prefix, cont) in enumerate(pairs):
    if not cont:
      raise ValueError(f"Row {r} has an empty continuation: nothing to score.")
    key = tuple(prefix)
    if key not in prefix_ids:
      prefix_ids[key] = len(rows_of)
      rows_of.append([])
    rows_of[prefix_ids[key]].append(r)
  prefixes = list(prefix_ids)
  order = sorted(range(len(prefixes)), key=lambda p: -len(prefixes[p]))
  max_rows = max(len(rows) for rows in rows_of)
  rows_cap = batch_size * max_rows
  scores = np.zeros(len(pairs), np.float64)
  truncated = 0
  # One shape for the whole call: one compilation per task (compiling dominates on CPU).
  c_len = _bucket(max(len(cont) for _, cont in pairs), _MIN_CONTINUATION_BUCKET)
  if 1 + c_len >= max_length:
    raise ValueError(
      f"A continuation of {c_len} tokens does not fit ModelConfig.max_length={max_length}."
    )
  p_len = min(_bucket(max(len(p) for p in prefixes), _MIN_PREFIX_BUCKET), max_length - 1 - c_len)
  for start in range(0, len(order), batch_size):
    batch_p = order[start : start + batch_size]
    rows = [r for p in batch_p for r in rows_of[p]]
    prefix_arr = np.zeros((batch_size, p_len), np.int32)
    for i, p in enumerate(batch_p):
      ids = prefixes[p][-p_len:] if p_len else ()
      truncated += len(ids) < len(prefixes[p])
      if ids:
        prefix_arr[i, p_len - len(ids) :] = ids
    cont_arr = np.zeros((rows_cap, c_len), np.int32)
    index = np.zeros((rows_cap,), np.int32)
    for j, r in enumerate(rows):
      cont = pairs[r][1]
      cont_arr[j, : len(cont)] = cont
      index[j] = batch_p.index(prefix_ids[tuple(pairs[r][0])])
    token_ll = decoding.score_continuations(
      model, params, prefix_arr, cont_arr, index, group_size=group_size
    )
    sums = distributed.to_host(token_ll).astype(np.float64).sum(axis=1)
    for j, r in enumerate(rows):
      scores[r] = sums[j]
  return scores, truncated


def generate_continuations(
  model: LanguageModel,
  params: Any,
  contexts: Sequence[Sequence[int]],
  *,
  max_decode_len: int,
  stop_ids: Sequence[int],
  batch_size: int = DEFAULT_BATCH_SIZE,
  group_size: int | None = None,
) -> tuple[list[list[int]], int]:
  """Greedy continuations (ids up to, not including, the first stop id) of each context.

  Returns:
    (ids per context, number of contexts cut from the left to fit ``max_length``).
  """
  max_length = model.config.max_length
  budget = max_length - 1 - max_decode_len
  if budget < 1:
    raise ValueError(
      f"max_decode_len={max_decode_len} leaves no room for a prompt in "
      f"ModelConfig.max_length={max_length}."
    )
  order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
  outputs: list[list[int]] = [[] for _ in contexts]
  truncated = 0
  stops = set(int(s) for s in stop_ids)
  p_len = min(_bucket(max(len(c) for c in contexts), _MIN_PREFIX_BUCKET), budget)
  for start in range(0, len(order), batch_size):
    batch = order[start : start + batch_size]
    arr = np.zeros((batch_size, p_len), np.int32)
    for row, i in enumerate(batch):
      ids = list(contexts[i])[-p_len:]
      truncated += len(ids) < len(contexts[i])
      arr[row, p_len - len(ids) :] = ids
    result = decoding.generate(
      model,
      params,
      arr,
      max_decode_len=max_decode_len,
      stop_ids=tuple(stops),
      group_size=group_size,
    )
    tokens = distributed.to_host(result.tokens)
    for row, i in enumerate(batch):
      out = []
      for t in tokens[row].tolist():
        if t in stops or t == decoding.PAD_ID:
          break
        out.append(t)
      outputs[i] = out
  return outputs, truncated


# ------------------------------------------------------------------------------------ tasks
@dataclasses.dataclass
class TaskResult:
  """Metrics of one task plus the per-row material behind them (for JSONL output)."""

  metrics: dict[str, float]
  rows: list[dict[str, Any]]
  outputs: list[Any]  # scores (multiple choice) or prediction strings (generation), per row


def evaluate_task(
  model: LanguageModel,
  params: Any,
  vocabulary: seqio.Vocabulary,
  task_name: str,
  k: int | None = None,
  *,
  max_examples: int | None = DEFAULT_MAX_EXAMPLES,
  split: str | None = None,
  seed: int | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  group_size: int | None = None,
) -> TaskResult:
  """Runs one few-shot task; see ``run_fewshot``."""
  task = prompts.get_task(task_name)
  rows = list(prompts.iter_rows(task, split, k, max_examples, seed))
  pairs = [prompts.encode_pair(vocabulary, r["inputs"], r["targets"]) for r in rows]
  post = prompts.FewShotPostprocessor(task.name)
  targets = [
    post(r["targets"], example={**r, "targets": cont}, is_target=True)
    for r, (_, cont) in zip(rows, pairs)
  ]
  metrics: dict[str, float] = {}
  if task.kind == prompts.MULTIPLE_CHOICE:
    outputs, truncated = score_pairs(
      model, params, pairs, batch_size=batch_size, group_size=group_size
    )
    outputs = outputs.tolist()
    for fn in task.metric_fns():
      metrics.update(fn(targets, outputs))
    metrics["chance"] = metrics_lib.rank_classification_chance(targets)
  else:
    stops = [vocabulary.eos_id]
    newline = stop_token_id(vocabulary, task.stop)
    if newline is not None:
      stops.append(newline)
    contexts = [list(vocabulary.encode(r["inputs"])) for r in rows]
    ids, truncated = generate_continuations(
      model,
      params,
      contexts,
      max_decode_len=task.max_decode_len,
      stop_ids=stops,
      batch_size=batch_size,
      group_size=group_size,
    )
    outputs = [post(vocabulary.decode(t), is_target=False) for t in ids]
    for fn in task.metric_fns():
      metrics.update(fn(targets, outputs))
    metrics["chance"] = 0.0
  metrics = {m: float(v) for m, v in metrics.items()}
  metrics["num_examples"] = len({r["idx"] for r in rows})
  if truncated:
    logging.warning(
      "%s: %d prompts were cut from the left to fit max_length=%d.",
      task.name,
      truncated,
      model.config.max_length,
    )
  return TaskResult(metrics=metrics, rows=rows, outputs=outputs)


def _check_vocabulary(model: LanguageModel, vocabulary: seqio.Vocabulary) -> None:
  if vocabulary.vocab_size > model.config.vocab_size:
    raise ValueError(
      f"The vocabulary has {vocabulary.vocab_size} ids but the model only "
      f"{model.config.vocab_size} logits: build the model with "
      "lm.build_model(config, vocabulary.vocab_size)."
    )


def default_task_names() -> list[str]:
  """The registered tasks whose data is present (``prompts.available_tasks``).

  With the default task module imported (``tasks``), these are the embedded tasks of
  ``tasks/fewshot.py`` whose data is present.

  Raises:
    prompts.FewShotError: no registered task declares its data present (no task module imported).
  """
  names = prompts.available_tasks()
  if not names:
    raise prompts.FewShotError(
      "No few-shot task with data present is registered: import a task module first (the CLIs "
      "import --tasks_module, default tasks; in Python, `import tasks`), or name the tasks."
    )
  return names


def run_fewshot(
  model: LanguageModel,
  params: Any,
  vocabulary: seqio.Vocabulary,
  task_names: Sequence[str] | None = None,
  k: int | None = None,
  *,
  max_examples: int | None = DEFAULT_MAX_EXAMPLES,
  split: str | None = None,
  seed: int | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  group_size: int | None = None,
) -> dict[str, dict[str, float]]:
  """Few-shot scores of ``params`` on each task.

  Args:
    model: the LanguageModel (its config; vocab_size must cover the vocabulary).
    params: params (boxed or unboxed, possibly sharded).
    vocabulary: the vocabulary the model was trained with.
    task_names: registered few-shot tasks (default: every embedded task whose data is present).
    k: demonstrations per prompt (default: ``prompts.FewshotDefaults``, gin
      ``fewshot_defaults.num_shots``, 1).
    max_examples: questions per task (the first of the task's stable order; None = all).
    split: split to score (default: each task's ``eval_split``).
    seed: demonstration seed (default: ``prompts.FewshotDefaults``, gin ``fewshot_defaults.seed``,
      0).
    batch_size: prompts per compiled call.
    group_size: MoE routing group size override (memory only).
  Returns:
    ``{task: {metric: value, "chance": value, "num_examples": n}}``; metrics in percent:
    multiple choice ``accuracy`` / ``accuracy_norm``, generation ``exact_match`` / ``f1``.
  """
  _check_vocabulary(model, vocabulary)
  params = nn.unbox(params)
  names = list(task_names) if task_names else default_task_names()
  results = {}
  for name in names:
    start = time.time()
    results[name] = evaluate_task(
      model,
      params,
      vocabulary,
      name,
      k,
      max_examples=max_examples,
      split=split,
      seed=seed,
      batch_size=batch_size,
      group_size=group_size,
    ).metrics
    logging.info("few-shot %s (k=%s): %s in %.1fs", name, k, results[name], time.time() - start)
  return results


def result_records(task_name: str, result: TaskResult) -> list[dict[str, Any]]:
  """One JSON-able record per question: prompt(s), choices/answers, scores/prediction, correct."""
  task = prompts.get_task(task_name)
  records: dict[int, dict[str, Any]] = {}
  for row, out in zip(result.rows, result.outputs):
    rec = records.setdefault(row["idx"], {"idx": row["idx"], "inputs": row["inputs"]})
    if task.kind == prompts.MULTIPLE_CHOICE:
      rec.setdefault("choices", []).append(row["targets"])
      rec.setdefault("scores", []).append(out)
      if row["is_correct"]:
        rec.setdefault("correct", []).append(row["choice"])
      if row["inputs"] != rec["inputs"]:
        rec.setdefault("choice_inputs", {})[row["choice"]] = row["inputs"]
    else:
      rec.update(answers=row["answers"], prediction=out)
  for rec in records.values():
    if "scores" in rec:
      rec["predicted"] = int(np.argmax(rec["scores"]))
      rec["is_correct"] = rec["predicted"] in rec.get("correct", [])
  return list(records.values())


# ------------------------------------------------------------------------------------ CLI
def fewshot_checkpoint(
  *,
  checkpoint_path: str = gin.REQUIRED,
  output_dir: str | None = None,
  task_names: Sequence[str] = (),
  num_shots: int | None = None,
  max_examples: int | None = DEFAULT_MAX_EXAMPLES,
  batch_size: int = DEFAULT_BATCH_SIZE,
  data_dir: str | None = None,
) -> dict[str, dict[str, float]]:
  """Evaluates a checkpoint on few-shot tasks and writes the results (see module docstring).

  The eval CLI registers this entry point with gin (``fewshot_checkpoint.checkpoint_path`` etc.).

  Args:
    checkpoint_path: a checkpoint step dir or a MODEL_DIR (latest checkpoint).
    output_dir: where results go (default: ``<step dir>/../../fewshot``, i.e. MODEL_DIR/fewshot).
    task_names: tasks (default: every embedded task whose data is present).
    num_shots: k (default: ``prompts.FewshotDefaults().num_shots``, gin
      ``fewshot_defaults.num_shots``).
    max_examples: questions per task (None: all).
    batch_size: prompts per compiled call.
    data_dir: data dir of the corpus tasks and the vocabulary (None: the usual resolution).
  """
  from lifelong_moe_jax.data import data_dir as data_dir_lib  # pylint: disable=import-outside-toplevel

  loaded = checkpoints.load_checkpoint(checkpoint_path, data_dir=data_dir)
  k = prompts.FewshotDefaults().num_shots if num_shots is None else int(num_shots)
  output_dir = output_dir or os.path.join(
    os.path.dirname(os.path.dirname(loaded.step_dir)), "fewshot"
  )
  os.makedirs(output_dir, exist_ok=True)
  names = list(task_names) or default_task_names()
  results = {}
  with data_dir_lib.using_data_dir(data_dir), loaded.partitioner.context():
    for name in names:
      result = evaluate_task(
        loaded.model,
        loaded.params,
        loaded.vocabulary,
        name,
        k,
        max_examples=max_examples,
        batch_size=batch_size,
      )
      results[name] = result.metrics
      with open(os.path.join(output_dir, f"{name}-k{k}.jsonl"), "w", encoding="utf-8") as f:
        for rec in result_records(name, result):
          f.write(json.dumps(rec, ensure_ascii=False) + "\n")
      logging.info("%s: %s", name, result.metrics)
  summary = {"checkpoint": loaded.step_dir, "step": loaded.step, "k": k, "results": results}
  with open(os.path.join(output_dir, f"fewshot-k{k}.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  print(format_results(results))
  return results


def format_results(results: dict[str, dict[str, float]]) -> str:
  """A plain-text table: task, primary metric, value, chance, examples."""
  lines = [f"{'task':28s} {'metric':14s} {'value':>7s} {'chance':>7s} {'n':>5s}"]
  for name, m in results.items():
    try:
      metric = prompts.get_task(name).primary_metric
    except prompts.FewShotError:
      metric = next(iter(m))
    lines.append(
      f"{name:28s} {metric:14s} {m.get(metric, float('nan')):7.1f} "
      f"{m.get('chance', float('nan')):7.1f} {int(m.get('num_examples', 0)):5d}"
    )
  return "\n".join(lines)
