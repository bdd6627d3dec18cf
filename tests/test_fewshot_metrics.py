"""Few-shot metrics equal hand-computed values; they follow seqio's metric-function conventions."""

import pytest
import seqio

from lifelong_moe_jax.eval import metrics
from lifelong_moe_jax.eval import prompts


def test_rank_classification_sum_and_length_normalised():
  # Question 0: choice 1 correct; sums -3 vs -4 pick choice 0 (wrong); per token -3/1 vs -4/4
  # pick choice 1 (right). Question 1: choice 0 correct and best either way.
  targets = [
    metrics.RankTarget(0, False, 1),
    metrics.RankTarget(0, True, 4),
    {"idx": 1, "is_correct": True, "num_tokens": 2},
    (1, False, 2),
  ]
  scores = [-3.0, -4.0, -1.0, -5.0]
  assert metrics.rank_classification(targets, scores) == {"accuracy": 50.0, "accuracy_norm": 100.0}
  assert metrics.rank_classification_chance(targets) == 50.0


def test_rank_classification_ties_multiple_and_missing_correct_choices():
  # Ties go to the first row; a question with two correct rows counts if either wins; one without
  # a correct row always counts as wrong.
  targets = [
    (0, True, 1),
    (0, False, 1),
    (1, False, 1),
    (1, True, 1),
    (1, True, 1),
    (2, False, 1),
    (2, False, 1),
  ]
  scores = [-1.0, -1.0, -3.0, -2.0, -2.5, -1.0, -2.0]
  out = metrics.rank_classification(targets, scores)
  assert out["accuracy"] == pytest.approx(200 / 3)
  assert metrics.rank_classification_chance(targets) == pytest.approx(100 * (1 / 2 + 2 / 3 + 0) / 3)
  with pytest.raises(ValueError, match="2 targets but 1 scores"):
    metrics.rank_classification(targets[:2], scores[:1])


def test_exact_match_and_f1_by_hand():
  targets = [["The Eiffel Tower", "Eiffel"], "Paris, France", b"blue whale", []]
  predictions = ["eiffel tower!", "France", "a whale that is blue", "anything"]
  # Normalised: "eiffel tower" == "eiffel tower"; "france" != "paris france"; "whale that is blue"
  # vs "blue whale"; no answers -> 0.
  assert metrics.exact_match(targets, predictions) == {"exact_match": 25.0}
  f1_row2 = 2 * (1 / 1) * (1 / 2) / (1 / 1 + 1 / 2)  # {france} vs {paris, france}
  f1_row3 = 2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2)  # 2 common of 4 predicted, 2 gold
  expected = 100 * (1.0 + f1_row2 + f1_row3 + 0.0) / 4
  assert metrics.token_f1(targets, predictions)["f1"] == pytest.approx(expected)


def test_code_normalisation_keeps_punctuation_and_case():
  targets = ["self.stats, f)", "None,"]
  predictions = ["self.stats,  f)", "none,"]
  assert metrics.code_exact_match(targets, predictions) == {"exact_match": 50.0}
  # Row 2 tokens: ["none", ","] vs ["None", ","] -> 1 common of 2 -> F1 0.5.
  assert metrics.code_token_f1(targets, predictions)["f1"] == pytest.approx(75.0)
  assert metrics.normalize_answer("  A  b\tc ", "code") == "A b c"
  with pytest.raises(ValueError, match="normalize must be one of"):
    metrics.normalize_answer("x", "nope")


def test_metric_functions_are_seqio_compatible():
  task_fns = {
    "mc": prompts.FewShotTask("t_mc", prompts.MULTIPLE_CHOICE, lambda s: ()).metric_fns(),
    "gen": prompts.FewShotTask("t_gen", prompts.GENERATION, lambda s: ()).metric_fns(),
  }
  seqio.TaskRegistry.add(
    "test_metric_conventions",
    source=seqio.FunctionDataSource(lambda split, shuffle_files: None, splits=["validation"]),
    output_features={},
    metric_fns=task_fns["mc"] + task_fns["gen"],
  )
  try:
    task = seqio.TaskRegistry.get("test_metric_conventions")
    assert task.score_metric_fns == [metrics.rank_classification]
    assert task.predict_metric_fns == [metrics.exact_match, metrics.token_f1]
  finally:
    seqio.TaskRegistry.remove("test_metric_conventions")
