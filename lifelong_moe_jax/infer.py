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
sequence and compares with the rest; ``score`` scores the whole sequence (empty ``inputs``). Task
sequences are cut to fit ``max_length``; a ``--prompt`` longer than ``max_length - 1 -
max_decode_len`` tokens is refused with one ``error:`` line (never cut). The model runs sharded on
the mesh (``MeshConfig``): params are restored into their shardings and batches are split over the
``data`` x ``expert`` axes.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags
from absl import logging
import gin
import jax
import seqio

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.eval import inference

MODES = inference.MODES
flags.DEFINE_string("prompt", None, "Print a continuation of this text instead of running a task.")


def infer(
  *,
  checkpoint_path: str = gin.REQUIRED,
  mixture_or_task_name: str | None = None,
  mode: str = "predict",
  output_dir: str | None = None,
  split: str | None = None,
  batch_size: int = 8,
  max_examples: int | None = None,
  max_decode_len: int = 64,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  prompt_fraction: float = 0.5,
  prompt: str | None = None,
  data_dir: str | None = None,
  model_config: ModelConfig | None = None,
  mesh_config: partitioning.MeshConfig | None = None,
) -> dict[str, str] | str:
  """Runs inference (see module docstring).

  Returns:
    ``{task: jsonl path}`` in task mode, the continuation text in prompt mode.
  """
  if mode not in MODES:
    raise ValueError(f"INFER_MODE must be one of {MODES}, got {mode!r}.")
  with data_dir_lib.using_data_dir(data_dir):
    loaded = checkpoints.load_checkpoint(
      checkpoint_path, model_config=model_config, mesh_config=mesh_config, data_dir=data_dir
    )
    if prompt is not None:
      inference.prompt_ids(loaded, prompt, max_decode_len)  # refuses an over-long prompt first
    logging.info("Restored %s (step %d).", loaded.step_dir, loaded.step)
    settings = dict(
      max_decode_len=max_decode_len, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    if prompt is not None:
      return inference.continue_prompt(loaded, prompt, **settings)
    if not mixture_or_task_name:
      raise ValueError("Set MIXTURE_OR_TASK_NAME (a task or mixture) or pass --prompt.")
    provider = pipeline.validate_task_name(mixture_or_task_name)
    task_names = (
      [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]
    )
    output_dir = output_dir or os.path.join(
      os.path.dirname(os.path.dirname(loaded.step_dir)), "infer"
    )
    paths = {}
    for name in task_names:
      records = inference.run_task(
        loaded,
        name,
        mode,
        split=split,
        batch_size=batch_size,
        max_examples=max_examples,
        prompt_fraction=prompt_fraction,
        **settings,
      )
      path = os.path.join(output_dir, f"{name}-{mode}.jsonl")
      if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)  # after the first task ran: a refusal writes nothing
        with open(path, "w", encoding="utf-8") as f:
          for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
      logging.info("Wrote %d %s records to %s.", len(records), mode, path)
      paths[name] = path
    return paths


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  gin_utils.apply_runtime_flags()
  gin_utils.import_task_modules()
  infer_fn = gin.external_configurable(infer, name="infer")
  gin_utils.parse_from_flags()
  prompt = flags.FLAGS.prompt
  result = infer_fn(prompt=prompt) if prompt is not None else infer_fn()
  if prompt is not None:
    print(prompt + result)
  else:
    for name, path in result.items():
      print(f"{name}: {path}")


if __name__ == "__main__":
  gin_utils.run(main)
