"""``python -m lifelong_moe_jax.infer``: predictions or log-likelihood scores of a checkpoint (t5x style).

    python -m lifelong_moe_jax.infer --gin_file=runs/infer.gin \\
      --gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"fewshot_polarity\\" \\
      --gin.INFER_MODE=\\"score\\"
    python -m lifelong_moe_jax.infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH=\\"/tmp/run\\" \\
      --prompt "def fibonacci(n):"

Task mode writes ``OUTPUT_DIR/<task>-<mode>.jsonl`` (default OUTPUT_DIR: ``MODEL_DIR/infer``), one
JSON object per example, for every task of the mixture:

* common: ``idx`` (position in the split), ``inputs`` and ``targets`` (text), plus ``choice`` and
  ``is_correct`` for few-shot multiple-choice rows;
* ``predict``: ``prediction`` (decoded text) and ``prediction_score`` (its log-likelihood);
* ``score``: ``score`` = log p(targets | inputs) summed over the target tokens (the training loss
  path, see ``decoding.score_continuations``) and ``num_target_tokens``.

Tasks with an ``inputs`` feature (few-shot tasks) are continued / scored from their inputs. Language
modelling tasks have only ``targets``: ``predict`` continues the first ``prompt_fraction`` of each
sequence and compares with the rest; ``score`` scores the whole sequence. Sequences are cut to fit
``max_length``. The model runs sharded on the mesh (``MeshConfig``): params are restored into their
shardings and batches are split over the ``data`` x ``expert`` axes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
from absl import logging
import gin
import jax
import numpy as np
import seqio

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import decoding
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import evaluation

MODES = ("predict", "score")
flags.DEFINE_string("prompt", None, "Print a continuation of this text instead of running a task.")


@dataclasses.dataclass
class LoadedCheckpoint:
  """A restored model: params sharded by ``partitioner``."""
  model: lm.LanguageModel
  params: Any
  vocabulary: seqio.Vocabulary
  partitioner: partitioning.Partitioner
  step_dir: str
  step: int
  metadata: dict[str, Any]


def model_config_from_metadata(metadata: Mapping[str, Any]) -> ModelConfig | None:
  """The ModelConfig saved with a checkpoint (``metadata["model_config"]``), or None."""
  saved = metadata.get("model_config")
  if not saved:
    return None
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in saved.items() if k in names})


def load_checkpoint(checkpoint_path: str, *, model_config: ModelConfig | None = None,
                    mesh_config: partitioning.MeshConfig | None = None,
                    data_dir: str | None = None) -> LoadedCheckpoint:
  """Restores the params of a checkpoint for inference.

  Args:
    checkpoint_path: a step dir, ``MODEL_DIR/checkpoints`` or ``MODEL_DIR`` (latest step).
    model_config: the model; default: the config saved in the checkpoint's metadata (so expanded
      lifelong checkpoints load with their expert count), else ``ModelConfig()`` from gin.
    mesh_config: the mesh (default ``MeshConfig()`` from gin).
    data_dir: where the vocabulary is (None: the usual resolution).
  Raises:
    checkpoints.CheckpointNotFoundError / CheckpointMismatchError / ValueError (vocabulary).
  """
  step_dir = checkpoints.resolve_step_dir(checkpoint_path)
  metadata = checkpoints.read_metadata(step_dir)
  vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
  checkpoints.check_vocabulary(step_dir, vocab_lib.vocabulary_fingerprint(vocabulary))
  config = model_config or model_config_from_metadata(metadata) or ModelConfig()
  model = lm.build_model(config, vocabulary.vocab_size)
  mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
  partitioning.validate_model_for_mesh(model.config, mesh)
  partitioner = partitioning.Partitioner(mesh)
  params = checkpoints.restore_params(step_dir, evaluation.sharded_abstract_params(model, partitioner),
                                      model_config=dataclasses.asdict(model.config))
  return LoadedCheckpoint(model, params, vocabulary, partitioner, step_dir,
                          int(metadata.get("step", 0)), metadata)


# ------------------------------------------------------------------------------------ data
def _default_split(task_name: str) -> str:
  from lifelong_moe_jax.eval import prompts  # pylint: disable=import-outside-toplevel
  try:
    return prompts.get_task(task_name).eval_split
  except prompts.FewShotError:
    return "validation"


def task_examples(task: seqio.Task, split: str, max_length: int,
                  max_examples: int | None) -> Iterator[dict[str, Any]]:
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


def split_example(ex: Mapping[str, Any], prompt_fraction: float) -> tuple[list[int], list[int]]:
  """(prompt ids, target ids): ``inputs``/``targets``, or a cut of a targets-only LM example."""
  targets = [int(t) for t in ex["targets"] if t != 0]
  if "inputs" in ex:
    return [int(t) for t in ex["inputs"] if t != 0], targets
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
    yield items[start:start + size]


def _pad_rows(rows: Sequence[Sequence[int]], count: int, width: int, left: bool) -> np.ndarray:
  arr = np.zeros((count, width), np.int32)
  for i, ids in enumerate(rows):
    ids = list(ids)[-width:] if left else list(ids)[:width]
    if ids:
      if left:
        arr[i, width - len(ids):] = ids
      else:
        arr[i, :len(ids)] = ids
  return arr


def _bucket(n: int, minimum: int = 16) -> int:
  size = minimum
  while size < n:
    size *= 2
  return size


def run_task(loaded: LoadedCheckpoint, task_name: str, mode: str, *, split: str | None = None,
             batch_size: int = 8, max_examples: int | None = None, max_decode_len: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             prompt_fraction: float = 0.5) -> list[dict[str, Any]]:
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
      pairs = [split_example(ex, prompt_fraction) for ex in batch]
      if mode == "score":
        c_len = _bucket(max(max(len(t) for _, t in pairs), 1), 4)
        c_len = min(c_len, max_length - 1)
        p_len = min(_bucket(max(len(p) for p, _ in pairs)), max_length - 1 - c_len)
        prefixes = jax.device_put(_pad_rows([p for p, _ in pairs], batch_size, p_len, True), sharding)
        conts = jax.device_put(_pad_rows([t for _, t in pairs], batch_size, c_len, False), sharding)
        token_ll = np.asarray(decoding.score_continuations(model, loaded.params, prefixes, conts,
                                                           group_size=group_size))
        for i, ex in enumerate(batch):
          n = min(len(pairs[i][1]), c_len)
          records.append({"score": float(token_ll[i].sum()), "num_target_tokens": n,
                          **_record_text(ex, pairs[i], vocabulary)})
      else:
        p_len = min(_bucket(max(len(p) for p, _ in pairs)), max_length - 1 - max_decode_len)
        if p_len < 1:
          raise ValueError(f"max_decode_len={max_decode_len} leaves no room for a prompt in "
                           f"max_length={max_length}.")
        prompts_arr = jax.device_put(_pad_rows([p for p, _ in pairs], batch_size, p_len, True),
                                     sharding)
        result = decoding.generate(model, loaded.params, prompts_arr, max_decode_len=max_decode_len,
                                   rng=jax.random.fold_in(rng, b), temperature=temperature,
                                   top_k=top_k, top_p=top_p, stop_ids=(vocabulary.eos_id,),
                                   group_size=group_size)
        tokens, scores = np.asarray(result.tokens), np.asarray(result.scores)
        for i, ex in enumerate(batch):
          ids = [int(t) for t in tokens[i] if t != 0]
          records.append({"prediction": vocabulary.decode(ids),
                          "prediction_score": float(scores[i]),
                          **_record_text(ex, pairs[i], vocabulary)})
  for idx, rec in enumerate(records):
    rec["idx"] = idx
  return records


def _record_text(ex: Mapping[str, Any], pair: tuple[list[int], list[int]],
                 vocabulary: seqio.Vocabulary) -> dict[str, Any]:
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


def continue_prompt(loaded: LoadedCheckpoint, text: str, *, max_decode_len: int = 64,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0) -> str:
  """The model's continuation of ``text`` (stops at EOS)."""
  ids = list(loaded.vocabulary.encode(text))
  budget = loaded.model.config.max_length - 1 - max_decode_len
  if budget < 1:
    raise ValueError(f"max_decode_len={max_decode_len} does not fit max_length="
                     f"{loaded.model.config.max_length}.")
  arr = _pad_rows([ids], 1, min(_bucket(len(ids)), budget), True)
  result = decoding.generate(loaded.model, loaded.params, arr, max_decode_len=max_decode_len,
                             rng=jax.random.PRNGKey(seed), temperature=temperature, top_k=top_k,
                             top_p=top_p, stop_ids=(loaded.vocabulary.eos_id,))
  return loaded.vocabulary.decode([int(t) for t in np.asarray(result.tokens)[0] if t != 0])


@gin.configurable
def infer(*, checkpoint_path: str = gin.REQUIRED, mixture_or_task_name: str | None = None,
          mode: str = "predict", output_dir: str | None = None, split: str | None = None,
          batch_size: int = 8, max_examples: int | None = None, max_decode_len: int = 64,
          temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
          prompt_fraction: float = 0.5, prompt: str | None = None, data_dir: str | None = None,
          model_config: ModelConfig | None = None,
          mesh_config: partitioning.MeshConfig | None = None) -> dict[str, str] | str:
  """Runs inference (see module docstring).

  Returns:
    ``{task: jsonl path}`` in task mode, the continuation text in prompt mode.
  """
  if mode not in MODES:
    raise ValueError(f"INFER_MODE must be one of {MODES}, got {mode!r}.")
  with data_dir_lib.using_data_dir(data_dir):
    loaded = load_checkpoint(checkpoint_path, model_config=model_config, mesh_config=mesh_config,
                             data_dir=data_dir)
    logging.info("Restored %s (step %d).", loaded.step_dir, loaded.step)
    settings = dict(max_decode_len=max_decode_len, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed)
    if prompt is not None:
      return continue_prompt(loaded, prompt, **settings)
    if not mixture_or_task_name:
      raise ValueError("Set MIXTURE_OR_TASK_NAME (a task or mixture) or pass --prompt.")
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    task_names = [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) \
        else [provider.name]
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.dirname(loaded.step_dir)),
                                            "infer")
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for name in task_names:
      records = run_task(loaded, name, mode, split=split, batch_size=batch_size,
                         max_examples=max_examples, prompt_fraction=prompt_fraction, **settings)
      path = os.path.join(output_dir, f"{name}-{mode}.jsonl")
      if jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as f:
          for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
      logging.info("Wrote %d %s records to %s.", len(records), mode, path)
      paths[name] = path
    return paths


def main(argv: Sequence[str]) -> None:
  from lifelong_moe_jax import gin_utils  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  import tasks  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import tasks.fewshot  # noqa: F401  pylint: disable=import-outside-toplevel
  gin_utils.parse_from_flags()
  prompt = flags.FLAGS.prompt
  result = infer(prompt=prompt) if prompt is not None else infer()
  if prompt is not None:
    print(prompt + result)
  else:
    for name, path in result.items():
      print(f"{name}: {path}")


if __name__ == "__main__":
  from lifelong_moe_jax import gin_utils as _gin_utils  # pylint: disable=ungrouped-imports
  _gin_utils.run(main)
