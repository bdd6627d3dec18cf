"""Few-shot engine on a model whose answers are known: an exact bigram LM built from params.

With zero attention/MLP/expert output weights the residual stream is the token embedding; with
one-hot embeddings the final RMSNorm gives ``sqrt(d) * e_x`` and the logits are row ``x`` of the
output kernel times ``sqrt(d)``. Setting that kernel to ``TABLE / sqrt(d)`` makes the model a
bigram LM with logits ``TABLE[current token]``, so every score and answer can be computed by hand.
"""

import dataclasses

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from lifelong_moe_jax.eval import fewshot
from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.eval.prompts import FewShotExample, FewShotTask
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.models.lm import LanguageModel

VOCAB = seqio.ByteVocabulary()
V = 260  # >= the byte vocabulary's 259 ids; also the width, so embeddings can be one-hot
HIGH = 8.0


def tok(ch: str) -> int:
  return VOCAB.encode(ch)[0]


def bigram_table() -> np.ndarray:
  """Each letter is followed by the next one (a->b, ..., y->z), h->newline; 'z' has no preference,
  so greedy decoding picks the lowest non-pad id there: EOS."""
  table = np.zeros((V, V), np.float32)
  for a, b in zip("abcdefghijklmnopqrstuvwxy", "bcdefghijklmnopqrstuvwxyz"):
    table[tok(a), tok(b)] = HIGH
  table[tok("h")] = 0.0
  table[tok("h"), tok("\n")] = HIGH
  return table


def bigram_model():
  cfg = ModelConfig(
    vocab_size=V,
    embed_dim=V,
    num_layers=2,
    num_heads=1,
    head_dim=8,
    mlp_dim=8,
    num_experts=2,
    top_k=1,
    group_size=32,
    eval_capacity_factor=1.0,
    max_length=96,
  )
  model = LanguageModel(cfg)
  params = flax.traverse_util.flatten_dict(nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0))))
  for path in params:
    if path[-1] in ("out", "wo"):
      params[path] = jnp.zeros_like(params[path])
  params[("embed", "embedding")] = jnp.eye(V)
  params[("logits",)] = jnp.asarray(bigram_table()) / np.sqrt(V)
  return model, flax.traverse_util.unflatten_dict(params)


def analytic_score(prompt: str, continuation: str) -> float:
  """sum log softmax(TABLE[prev]) over the continuation (RMSNorm's epsilon scales logits slightly)."""
  scale = 1.0 / np.sqrt(1.0 + V * 1e-6)
  table = bigram_table() * scale
  ids = VOCAB.encode(prompt + continuation)
  total = 0.0
  for i in range(len(VOCAB.encode(prompt)), len(ids)):
    row = table[ids[i - 1]]
    total += row[ids[i]] - np.log(np.sum(np.exp(row)))
  return float(total)


MC_EVAL = (
  FewShotExample("abc", choices=("d", "x", "k"), correct=(0,)),
  FewShotExample("ef", choices=("zz", "gh"), correct=(1,)),
  FewShotExample("k", choices=("q", "lmn"), correct=(1,)),
  # Sum prefers "q" (one unlikely token); per-token normalisation prefers "lx" (correct).
  FewShotExample("k", choices=("lx", "q"), correct=(0,)),
)
MC_DEMOS = (
  FewShotExample("pq", choices=("r", "a"), correct=(0,)),
  FewShotExample("uv", choices=("b", "w"), correct=(1,)),
)
GEN_EVAL = (
  FewShotExample("abc", answers=("defgh",)),
  FewShotExample("wx", answers=("yz", "y")),
  FewShotExample("m", answers=("zzz",)),
)
GEN_DEMOS = (FewShotExample("st", answers=("uv",)),)


@pytest.fixture(scope="module")
def bigram():
  mc = prompts.register(
    FewShotTask(
      "test_bigram_mc",
      prompts.MULTIPLE_CHOICE,
      lambda split: MC_EVAL if split == "validation" else MC_DEMOS,
    ),
    seqio_task=False,
  )
  gen = prompts.register(
    FewShotTask(
      "test_bigram_gen",
      prompts.GENERATION,
      lambda split: GEN_EVAL if split == "validation" else GEN_DEMOS,
      max_decode_len=8,
    ),
    seqio_task=False,
  )
  model, params = bigram_model()
  return model, params, mc, gen


def test_rank_classification_picks_the_known_answers_and_scores_are_exact(bigram):
  model, params, mc, _ = bigram
  result = fewshot.evaluate_task(model, params, VOCAB, mc.name, k=1, batch_size=2)
  assert result.metrics == {
    "accuracy": 75.0,
    "accuracy_norm": 100.0,
    "chance": pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 4),
    "num_examples": 4,
  }
  for row, score in zip(result.rows, result.outputs):
    # The prompt starts with one demonstration; a bigram model only sees the query's last token.
    assert row["inputs"].count("\n\n") == 1
    query = MC_EVAL[row["idx"]].prompt
    assert row["inputs"].endswith("\n\n" + query)
    assert score == pytest.approx(analytic_score(row["inputs"], row["targets"]), abs=2e-3)


def test_generation_stops_at_newline_and_eos_and_scores_exact_match(bigram):
  model, params, _, gen = bigram
  result = fewshot.evaluate_task(model, params, VOCAB, gen.name, k=1, batch_size=2)
  # abc -> defgh then newline (stop); wx -> yz then EOS ('z' has no preference); m -> nopq...
  assert result.outputs == ["defgh", "yz", "nopqrstu"]
  assert result.metrics["exact_match"] == pytest.approx(200 / 3)
  assert result.metrics["chance"] == 0.0 and result.metrics["num_examples"] == 3
  records = fewshot.result_records(gen.name, result)
  assert records[0]["prediction"] == "defgh" and records[1]["answers"] == ["yz", "y"]


def test_run_fewshot_returns_metrics_chance_and_counts_per_task(bigram):
  model, params, mc, gen = bigram
  results = fewshot.run_fewshot(
    model, params, VOCAB, [mc.name, gen.name], 0, max_examples=2, batch_size=2
  )
  assert set(results) == {mc.name, gen.name}
  assert set(results[mc.name]) == {"accuracy", "accuracy_norm", "chance", "num_examples"}
  assert set(results[gen.name]) == {"exact_match", "f1", "chance", "num_examples"}
  assert results[mc.name]["num_examples"] == 2 and results[mc.name]["accuracy"] == 100.0
  table = fewshot.format_results(results)
  assert mc.name in table and "accuracy" in table


def test_vocabulary_larger_than_the_model_is_a_clear_error(bigram):
  _, params, mc, _ = bigram
  small = LanguageModel(dataclasses.replace(bigram[0].config, vocab_size=100))
  with pytest.raises(ValueError, match="259 ids but the model only 100"):
    fewshot.run_fewshot(small, params, VOCAB, [mc.name], 0)


def test_long_prompts_are_cut_from_the_left(bigram):
  model, params, _, _ = bigram
  long_prefix = VOCAB.encode("x" * 200 + "abc")
  scores, truncated = fewshot.score_pairs(model, params, [(long_prefix, VOCAB.encode("d"))])
  assert truncated == 1
  assert scores[0] == pytest.approx(analytic_score("abc", "d"), abs=2e-3)


def test_fewshot_defaults_is_a_gin_configurable_dataclass():
  assert prompts.FewshotDefaults() == prompts.FewshotDefaults(num_shots=1, seed=0)
  try:
    gin.parse_config(["fewshot_defaults.num_shots = 3", "fewshot_defaults.seed = 7"])
    assert prompts.FewshotDefaults() == prompts.FewshotDefaults(3, 7)
    assert prompts.FewshotDefaults(num_shots=0).num_shots == 0  # explicit arguments win
  finally:
    gin.clear_config()
  with pytest.raises(prompts.FewShotError, match="num_shots must be >= 0"):
    prompts.FewshotDefaults(num_shots=-1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    prompts.FewshotDefaults().seed = 1  # pytype: disable=not-writable


def test_default_task_list_comes_from_is_available(monkeypatch):
  monkeypatch.setattr(prompts, "_TASKS", dict(prompts._TASKS))  # registrations end with the test
  present = prompts.register(
    FewShotTask(
      "test_available_yes",
      prompts.MULTIPLE_CHOICE,
      lambda split: MC_EVAL,
      is_available=lambda: True,
    ),
    seqio_task=False,
  )
  absent = prompts.register(
    FewShotTask(
      "test_available_no",
      prompts.MULTIPLE_CHOICE,
      lambda split: MC_EVAL,
      is_available=lambda: False,
    ),
    seqio_task=False,
  )
  names = prompts.available_tasks()
  assert present.name in names and absent.name not in names
  assert "test_bigram_mc" not in names  # registered without is_available: only when named
  assert fewshot.default_task_names() == names


def test_unknown_task_names_the_task_module_flag():
  with pytest.raises(prompts.FewShotError, match="--tasks_module"):
    prompts.get_task("no_such_fewshot_task")


def test_demonstrations_are_deterministic_and_seeded(bigram):
  _, _, mc, _ = bigram
  a = [r["inputs"] for r in prompts.iter_rows(mc, num_shots=1, seed=0)]
  b = [r["inputs"] for r in prompts.iter_rows(mc, num_shots=1, seed=0)]
  assert a == b
  demos = {
    prompts.render(mc, MC_EVAL[0], prompts.demonstrations(mc, 0, 1, "validation", s))
    for s in range(8)
  }
  assert demos == {"pqr\n\nabc", "uvw\n\nabc"}  # both demonstrations occur across seeds
  with pytest.raises(prompts.FewShotError, match="3 demonstrations requested"):
    prompts.demonstrations(mc, 0, 3, "validation")
