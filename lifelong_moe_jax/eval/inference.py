"""Predictions and log-likelihood scores of a restored checkpoint over seqio tasks.

The library behind ``python -m lifelong_moe_jax.infer`` (see that module for the JSONL format):

* ``run_task``: records of one task in ``"predict"`` mode (greedy/sampled continuation of each
  example's prompt) or ``"score"`` mode (log p(targets | inputs) summed over target tokens);
* ``continue_prompt``: the continuation of one text.

Tasks with an ``inputs`` feature (few-shot tasks) are continued / scored from their inputs. Language
modelling tasks have only ``targets``: ``predict`` continues the first ``prompt_fraction`` of each
chunk and compares with the rest; ``score`` scores the whole chunk (every token, from BOS; its
record has empty ``inputs``). The model runs sharded on the loaded checkpoint's mesh.
``continue_prompt`` refuses a prompt longer than ``max_length - 1 - max_decode_len`` tokens
(``PromptTooLongError``) instead of cutting it. In task mode, prompts are cut from the left to fit.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio

from lifelong_moe_jax import decoding
from lifelong_moe_jax import distributed
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.checkpoints import LoadedCheckpoint

MODES = ("predict", "score")


def _default_split(task_name: str) -> str:
  from lifelong_moe_jax.eval import prompts  # pylint: disable=import-outside-toplevel

  try:
    return prompts.get_task(task_name).eval_split
  except prompts.FewShotError:
    return "validation"


def task_examples(
  task: seqio.Task, split: str, max_length: int, max_examples: int | None
) -> Iterator[dict[str, Any]]:
  """Tokenized numpy examples of ``task``'s split, in order.

  Prompted tasks (with ``inputs``) are read untrimmed (``run_task`` cuts prompts from the left);
  language-modelling tasks are cut into chunks of ``max_length - 1`` tokens.
  """
  lengths = None if "inputs" in task.output_features else {"targets": max_length - 1}
  ds = task.get_dataset(sequence_length=lengths, split=split, shuffle=False)
  for i, ex in enumerate(ds.as_numpy_iterator()):
    if max_examples is not None and i >= max_examples:
      return
    yield ex


def split_example(
  ex: Mapping[str, Any], prompt_fraction: float, *, whole: bool = False
) -> tuple[list[int], list[int]]:
  """(prompt ids, target ids): ``inputs``/``targets``, or for a targets-only LM example a cut at
  ``prompt_fraction`` (predict mode) or, with ``whole`` (score mode), no prompt and every token."""
  targets = [int(t) for t in ex["targets"] if t != 0]
  if "inputs" in ex:
    return [int(t) for t in ex["inputs"] if t != 0], targets
  if whole:
    return [], targets
  cut = max(1, int(len(targets) * prompt_fraction)) if len(targets) > 1 else 0
  return targets[:cut], targets[cut:]


def _extra_fields(ex: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for key in ("choice", "is_correct"):
    if key in ex:
      out[key] = ex[key].item() if hasattr(ex[key], "item") else ex[key]
  return out


# ------------------------------------------------------------------------------------ running
def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start : start + size]


def _pad_rows(rows: Sequence[Sequence[int]], count: int, width: int, left: bool) -> np.ndarray:
  arr = np.zeros((count, width), np.int32)
  for i, ids in enumerate(rows):
    ids = list(ids)[-width:] if left else list(ids)[:width]
    if ids:
      if left:
        arr[i, width - len(ids) :] = ids
      else:
        arr[i, : len(ids)] = ids
  return arr


def _bucket(n: int, minimum: int = 16) -> int:
  size = minimum
  while size < n:
    size *= 2
  return size


def run_task(
  loaded: LoadedCheckpoint,
  task_name: str,
  mode: str,
  *,
  split: str | None = None,
  batch_size: int = 8,
  max_examples: int | None = None,
  max_decode_len: int = 64,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  prompt_fraction: float = 0.5,
) -> list[dict[str, Any]]:
  """JSON-able records of one task (see module docstring)."""
  if mode not in MODES:
    raise ValueError(f"INFER_MODE must be one of {MODES}, got {mode!r}.")
  model, vocabulary, partitioner = loaded.model, loaded.vocabulary, loaded.partitioner
  partitioning.validate_batch_for_mesh(batch_size, partitioner.mesh)
  shards = partitioner.mesh.shape["data"] * partitioner.mesh.shape["expert"]
  group_size = max(1, batch_size // shards)  # routing groups split evenly over the batch shards
  max_length = model.config.max_length
  task = seqio.get_mixture_or_task(task_name)
  split = split or _default_split(task_name)
  examples = list(task_examples(task, split, max_length, max_examples))
  records: list[dict[str, Any]] = []
  rng = jax.random.PRNGKey(seed)
  sharding = partitioner.batch_sharding()
  with partitioner.context():
    for b, batch in enumerate(_batches(examples, batch_size)):
      pairs = [split_example(ex, prompt_fraction, whole=mode == "score") for ex in batch]
      if mode == "score":
        c_len = _bucket(max(max(len(t) for _, t in pairs), 1), 4)
        c_len = min(c_len, max_length - 1)
        p_len = min(_bucket(max(len(p) for p, _ in pairs)), max_length - 1 - c_len)
        prefixes = jax.device_put(
          _pad_rows([p for p, _ in pairs], batch_size, p_len, True), sharding
        )
        conts = jax.device_put(_pad_rows([t for _, t in pairs], batch_size, c_len, False), sharding)
        token_ll = distributed.to_host(
          decoding.score_continuations(model, loaded.params, prefixes, conts, group_size=group_size)
        )
        for i, ex in enumerate(batch):
          n = min(len(pairs[i][1]), c_len)
          records.append(
            {
              "score": float(token_ll[i].sum()),
              "num_target_tokens": n,
              **_record_text(ex, pairs[i], vocabulary),
            }
          )
      else:
        p_len = min(
          _bucket(max(len(p) for p, _ in pairs)), prompt_budget(max_length, max_decode_len)
        )
        prompts_arr = jax.device_put(
          _pad_rows([p for p, _ in pairs], batch_size, p_len, True), sharding
        )
        result = decoding.generate(
          model,
          loaded.params,
          prompts_arr,
          max_decode_len=max_decode_len,
          rng=jax.random.fold_in(rng, b),
          temperature=temperature,
          top_k=top_k,
          top_p=top_p,
          stop_ids=(vocabulary.eos_id,),
          group_size=group_size,
        )
        tokens, scores = distributed.to_host(result.tokens), distributed.to_host(result.scores)
        for i, ex in enumerate(batch):
          ids = [int(t) for t in tokens[i] if t != 0]
          records.append(
            {
              "prediction": vocabulary.decode(ids),
              "prediction_score": float(scores[i]),
              **_record_text(ex, pairs[i], vocabulary),
            }
          )
  for idx, rec in enumerate(records):
    rec["idx"] = idx
  return records


def _record_text(
  ex: Mapping[str, Any], pair: tuple[list[int], list[int]], vocabulary: seqio.Vocabulary
) -> dict[str, Any]:
  if "inputs" in ex:
    inputs = _decode_field(ex, "inputs", vocabulary)
    targets = _decode_field(ex, "targets", vocabulary)
  else:
    inputs, targets = vocabulary.decode(pair[0]), vocabulary.decode(pair[1])
  return {"inputs": inputs, "targets": targets, **_extra_fields(ex)}


def _decode_field(ex: Mapping[str, Any], key: str, vocabulary: seqio.Vocabulary) -> str:
  raw = ex.get(f"{key}_pretokenized")
  if raw is not None:
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
  return vocabulary.decode([int(t) for t in ex[key] if t != 0])


class PromptTooLongError(ValueError):
  """A prompt does not fit the context next to the tokens to generate."""


def prompt_budget(max_length: int, max_decode_len: int) -> int:
  """Prompt tokens that fit: ``max_length - 1 (BOS) - max_decode_len``.

  Raises:
    ValueError: ``max_decode_len`` leaves no room for a prompt.
  """
  budget = max_length - 1 - max_decode_len
  if budget < 1:
    raise ValueError(
      f"max_decode_len={max_decode_len} leaves no room for a prompt in "
      f"ModelConfig.max_length={max_length}; lower infer.max_decode_len below "
      f"{max_length - 1}."
    )
  return budget


def prompt_ids(loaded: LoadedCheckpoint, text: str, max_decode_len: int) -> list[int]:
  """The token ids of prompt ``text``, checked to fit the context with ``max_decode_len`` more.

  Raises:
    PromptTooLongError: more tokens than ``max_length - 1 - max_decode_len``; a prompt is refused,
      never cut (the model would not see all of it).
  """
  ids = list(loaded.vocabulary.encode(text))
  max_length = loaded.model.config.max_length
  budget = prompt_budget(max_length, max_decode_len)
  if len(ids) > budget:
    fit = max_length - 1 - len(ids)  # the largest max_decode_len that leaves room for this prompt
    shorten = f"shorten the prompt to at most {budget} tokens"
    fix = (
      f"{shorten} or lower max_decode_len to {fit} (--gin.infer.max_decode_len={fit})"
      if fit >= 1
      else f"{shorten} (at most {max_length - 2} with max_decode_len=1)"
    )
    raise PromptTooLongError(
      f"The prompt is {len(ids)} tokens but only {budget} fit (max_length {max_length} - 1 - "
      f"max_decode_len {max_decode_len}): {fix}; prompts are never cut."
    )
  return ids


def continue_prompt(
  loaded: LoadedCheckpoint,
  text: str,
  *,
  max_decode_len: int = 64,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> str:
  """The model's continuation of ``text`` (stops at EOS).

  Raises:
    PromptTooLongError: see ``prompt_ids``.
  """
  ids = prompt_ids(loaded, text, max_decode_len)
  budget = prompt_budget(loaded.model.config.max_length, max_decode_len)
  arr = _pad_rows([ids], 1, min(_bucket(len(ids)), budget), True)
  result = decoding.generate(
    loaded.model,
    loaded.params,
    arr,
    max_decode_len=max_decode_len,
    rng=jax.random.PRNGKey(seed),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    stop_ids=(loaded.vocabulary.eos_id,),
  )
  return loaded.vocabulary.decode([int(t) for t in np.asarray(result.tokens)[0] if t != 0])
