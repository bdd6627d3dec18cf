"""infer CLI core: restores a checkpoint, runs sharded on the 8-device mesh, writes the JSONL schema."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import decoding
from lifelong_moe_jax import infer
from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.eval import inference
from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig

import tasks  # noqa: F401  (registers the corpora tasks)
import tasks.fewshot  # noqa: F401

CFG = ModelConfig(
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=32,
  num_experts=4,
  top_k=2,
  group_size=64,
  max_length=256,
)
COMMON = {"idx", "inputs", "targets"}


@pytest.fixture(scope="module")
def run_dir(prepared_data_dir, tmp_path_factory):
  with data_dir_lib.using_data_dir(prepared_data_dir):
    vocabulary = vocab_lib.get_vocabulary()
    model = lm.build_model(CFG, vocabulary.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0)))
    model_dir = str(tmp_path_factory.mktemp("run"))
    checkpoint_manager.save_state(
      model_dir,
      3,
      {"params": params, "step": np.int32(3)},
      {
        "vocabulary_fingerprint": vocab_lib.vocabulary_fingerprint(vocabulary),
        "model_config": dataclasses.asdict(model.config),
      },
    )
    yield model_dir, model, params, vocabulary


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_score_mode_jsonl_schema_and_teacher_forced_scores(run_dir, prepared_data_dir):
  model_dir, model, params, vocabulary = run_dir
  paths = infer.infer(
    checkpoint_path=model_dir,
    mixture_or_task_name="fewshot_polarity",
    mode="score",
    batch_size=8,
    max_examples=8,
    data_dir=prepared_data_dir,
  )
  assert list(paths) == ["fewshot_polarity"] and paths["fewshot_polarity"].endswith(
    "infer/fewshot_polarity-score.jsonl"
  )
  records = _read(paths["fewshot_polarity"])
  assert len(records) == 8 and [r["idx"] for r in records] == list(range(8))
  for rec in records:
    assert set(rec) == COMMON | {"score", "num_target_tokens", "choice", "is_correct"}
    assert rec["targets"] in (" negative", " positive") and rec["inputs"].endswith("\nSentiment:")
  # Scores equal the teacher-forced log-likelihood on the unsharded model.
  rec = records[1]
  ctx, cont = prompts.encode_pair(vocabulary, rec["inputs"], rec["targets"])
  assert len(ctx) + len(cont) < CFG.max_length - 4  # not cut
  assert rec["num_target_tokens"] == len(cont)
  targets = np.array([ctx + cont], np.int32)
  batch = {
    "decoder_input_tokens": np.concatenate([[[0]], targets[:, :-1]], axis=1),
    "decoder_target_tokens": targets,
    "decoder_loss_weights": np.array([[0] * len(ctx) + [1] * len(cont)], np.float32),
  }
  expected = float(jax.jit(decoding.decoding_model(model).score)(params, batch)[0])
  assert rec["score"] == pytest.approx(expected, abs=1e-3)


def test_predict_mode_on_a_language_modelling_task(run_dir, prepared_data_dir):
  model_dir, _, _, _ = run_dir
  paths = infer.infer(
    checkpoint_path=model_dir,
    mixture_or_task_name="lifelong_dialog_en",
    mode="predict",
    batch_size=8,
    max_examples=8,
    max_decode_len=8,
    data_dir=prepared_data_dir,
  )
  records = _read(paths["lifelong_dialog_en"])
  assert len(records) == 8
  for rec in records:
    assert set(rec) == COMMON | {"prediction", "prediction_score"}
    assert isinstance(rec["prediction"], str) and rec["prediction_score"] <= 0.0
    assert rec["inputs"] and rec["targets"]


def test_prompt_mode_and_errors(run_dir, prepared_data_dir):
  model_dir, _, _, _ = run_dir
  text = infer.infer(
    checkpoint_path=model_dir, prompt="Hello there", max_decode_len=4, data_dir=prepared_data_dir
  )
  assert isinstance(text, str)
  with pytest.raises(ValueError, match="INFER_MODE must be one of"):
    infer.infer(checkpoint_path=model_dir, mixture_or_task_name="fewshot_polarity", mode="bogus")
  with pytest.raises(checkpoints.CheckpointNotFoundError):
    infer.infer(checkpoint_path=model_dir + "/missing", mixture_or_task_name="fewshot_polarity")


def test_score_mode_on_a_language_modelling_task_scores_the_whole_chunk(run_dir, prepared_data_dir):
  """A targets-only task is scored whole (no prompt split): the score equals the teacher-forced
  log-likelihood of every token of the chunk from BOS, on the unsharded model."""
  model_dir, model, params, vocabulary = run_dir
  paths = infer.infer(
    checkpoint_path=model_dir,
    mixture_or_task_name="lifelong_dialog_en",
    mode="score",
    batch_size=8,
    max_examples=4,
    data_dir=prepared_data_dir,
  )
  records = _read(paths["lifelong_dialog_en"])
  with data_dir_lib.using_data_dir(prepared_data_dir):
    task = seqio.get_mixture_or_task("lifelong_dialog_en")
    chunks = [
      [int(t) for t in ex["targets"] if t != 0]
      for ex in inference.task_examples(task, "validation", CFG.max_length, 4)
    ]
  assert len(records) == len(chunks) == 4
  assert max(len(ids) for ids in chunks) == CFG.max_length - 1  # full-length chunks among them
  score = jax.jit(decoding.decoding_model(model).score)
  for rec, ids in zip(records, chunks):
    assert set(rec) == COMMON | {"score", "num_target_tokens"}
    assert rec["inputs"] == "" and rec["num_target_tokens"] == len(ids)
    assert rec["targets"] == vocabulary.decode(ids)
    targets = np.array([ids], np.int32)
    batch = {
      "decoder_input_tokens": np.concatenate([[[0]], targets[:, :-1]], axis=1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones_like(targets, np.float32),
    }
    assert rec["score"] == pytest.approx(float(score(params, batch)[0]), rel=1e-5, abs=1e-3)


def test_a_prompt_longer_than_the_context_is_refused(run_dir, prepared_data_dir):
  model_dir, _, _, vocabulary = run_dir
  text = " ".join(f"word{i}" for i in range(150))
  n = len(vocabulary.encode(text))
  assert n > CFG.max_length - 1 - 64
  with pytest.raises(inference.PromptTooLongError) as err:
    infer.infer(checkpoint_path=model_dir, prompt=text, data_dir=prepared_data_dir)
  assert str(err.value) == (
    f"The prompt is {n} tokens but only 191 fit (max_length 256 - 1 - max_decode_len 64): "
    "shorten the prompt to at most 191 tokens (at most 254 with max_decode_len=1); prompts are "
    "never cut."
  )
  short = " ".join(f"word{i}" for i in range(40))
  n = len(vocabulary.encode(short))
  fit = CFG.max_length - 1 - n
  with pytest.raises(
    inference.PromptTooLongError,
    match=rf"lower max_decode_len to {fit} "
    rf"\(--gin\.infer\.max_decode_len={fit}\)",
  ):
    infer.infer(
      checkpoint_path=model_dir,
      prompt=short,
      max_decode_len=CFG.max_length - 2 - 1,
      data_dir=prepared_data_dir,
    )
