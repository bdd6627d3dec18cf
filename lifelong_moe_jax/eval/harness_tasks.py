"""lm-evaluation-harness tasks for ``eval.harness.LifelongMoeLM``: run them, export ours to them.

``evaluate`` runs harness tasks (built-in, or YAMLs under an ``include_path``) on the model and
``metric_values`` flattens the results to ``{task: {metric: value}}``; ``unknown_tasks`` checks
names before any work. ``export_fewshot_task`` writes one of our embedded multiple-choice few-shot
tasks as a local harness task (JSONL data and a YAML over it, no network), so the harness scores
exactly our engine's (prompt, choice) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.eval.harness import LifelongMoeLM
from lifelong_moe_jax.eval.harness import require_harness


# ------------------------------------------------------------------------------------ running
def evaluate(
  lm: LifelongMoeLM,
  tasks: Sequence[str],
  *,
  num_fewshot: int | None = None,
  include_path: str | Sequence[str] | None = None,
  limit: int | float | None = None,
  bootstrap_iters: int = 0,
  **kwargs: Any,
) -> dict[str, Any]:
  """The harness's ``simple_evaluate`` of ``lm`` on ``tasks`` (its results dict).

  Args:
    lm: the model.
    tasks: harness task or group names (built-in, or defined by YAMLs under ``include_path``).
    num_fewshot: demonstrations per prompt (None: each task's default).
    include_path: folder(s) of extra task YAMLs.
    limit: examples per task (None: all).
    bootstrap_iters: stderr bootstrap resamples (0: none, fast).
    **kwargs: more ``simple_evaluate`` options.
  """
  lm_eval = require_harness()
  return lm_eval.simple_evaluate(
    model=lm,
    tasks=list(tasks),
    num_fewshot=num_fewshot,
    limit=limit,
    task_manager=task_manager(include_path),
    bootstrap_iters=bootstrap_iters,
    log_samples=kwargs.pop("log_samples", False),
    **kwargs,
  )


def unknown_tasks(
  tasks: Sequence[str], include_path: str | Sequence[str] | None = None
) -> list[str]:
  """The names in ``tasks`` that the harness knows neither as built-in nor under ``include_path``."""
  known = set(task_manager(include_path).all_tasks)
  return [t for t in tasks if t not in known]


def task_manager(include_path: str | Sequence[str] | None = None) -> Any:
  """The harness's ``TaskManager`` for ``include_path``, built once per path (indexing the
  harness's thousands of task YAMLs takes a while on CPU; phases reuse it)."""
  require_harness()
  key = (
    include_path if include_path is None or isinstance(include_path, str) else tuple(include_path)
  )
  return _task_manager(key)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | tuple[str, ...] | None) -> Any:
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  return TaskManager(
    include_path=list(include_path) if isinstance(include_path, tuple) else include_path
  )


def metric_values(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """``{task: {metric: value}}`` from a results dict (numbers only; ``acc,none`` -> ``acc``)."""
  out: dict[str, dict[str, float]] = {}
  for task, values in results.get("results", {}).items():
    row = {}
    for key, value in values.items():
      metric, _, filt = key.partition(",")
      if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
        row[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    out[task] = row
  return out


# ------------------------------------------------------------------------------------ local tasks
def write_fewshot_jsonl(
  task_name: str,
  path: str,
  *,
  k: int | None = None,
  max_examples: int | None = None,
  split: str | None = None,
  seed: int | None = None,
) -> int:
  """Writes one of our multiple-choice few-shot tasks as harness-ready JSONL; returns the count.

  Each line is one question: ``{"idx", "query", "choices", "gold"}`` where ``query`` is our k-shot
  prompt (``prompts.iter_rows``: same demonstrations and separator as ``run_fewshot``),
  ``choices`` the continuations and ``gold`` the correct index (a list when several are correct).
  Run it with ``num_fewshot: 0`` and ``target_delimiter: ""`` (``write_task_yaml``): the harness
  then scores exactly our engine's (prompt, choice) pairs.

  Raises:
    prompts.FewShotError: the task is not multiple choice, or has per-choice prompts.
  """
  task = prompts.get_task(task_name)
  if task.kind != prompts.MULTIPLE_CHOICE:
    raise prompts.FewShotError(
      f"{task_name} is a generation task; only multiple-choice tasks are exported to harness JSONL."
    )
  questions: dict[int, dict[str, Any]] = {}
  for row in prompts.iter_rows(task, split, k, max_examples, seed):
    q = questions.setdefault(
      row["idx"], {"idx": row["idx"], "query": row["inputs"], "choices": [], "gold": []}
    )
    if row["inputs"] != q["query"]:
      raise prompts.FewShotError(
        f"{task_name} has per-choice prompts; the harness's "
        "multiple_choice format needs one prompt per question."
      )
    if row["is_correct"]:
      q["gold"].append(len(q["choices"]))
    q["choices"].append(row["targets"])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for q in questions.values():
      q["gold"] = q["gold"][0] if len(q["gold"]) == 1 else q["gold"]
      f.write(json.dumps(q, ensure_ascii=False) + "\n")
  return len(questions)


TASK_YAML = """\
# Harness task over a local JSONL file (no network): one question per line,
# {{"query": prompt, "choices": [continuations], "gold": index}}.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task_yaml(task: str, data_file: str, yaml_path: str) -> str:
  """Writes a multiple-choice harness task ``task`` over local JSONL ``data_file``; returns the path.

  ``data_file`` is written as an absolute path (relative ones would resolve against the working
  directory of the run, not the YAML's folder).
  """
  os.makedirs(os.path.dirname(os.path.abspath(yaml_path)), exist_ok=True)
  with open(yaml_path, "w", encoding="utf-8") as f:
    f.write(TASK_YAML.format(task=task, data_file=json.dumps(os.path.abspath(data_file))))
  return yaml_path


@dataclasses.dataclass(frozen=True)
class LocalTask:
  """A harness task made from one of our embedded few-shot tasks (``export_fewshot_task``)."""

  name: str
  yaml_path: str
  data_file: str
  num_questions: int


def export_fewshot_task(
  task_name: str,
  folder: str,
  *,
  k: int | None = None,
  max_examples: int | None = None,
  harness_name: str | None = None,
) -> LocalTask:
  """Writes ``folder/<name>.jsonl`` and ``folder/<name>.yaml`` (use ``folder`` as include_path).

  The harness task name defaults to ``<task_name>_k<k>``.
  """
  k = prompts.FewshotDefaults().num_shots if k is None else int(k)
  name = harness_name or f"{task_name}_k{k}"
  data_file = os.path.join(folder, f"{name}.jsonl")
  count = write_fewshot_jsonl(task_name, data_file, k=k, max_examples=max_examples)
  yaml_path = write_task_yaml(name, data_file, os.path.join(folder, f"{name}.yaml"))
  return LocalTask(name, yaml_path, os.path.abspath(data_file), count)
