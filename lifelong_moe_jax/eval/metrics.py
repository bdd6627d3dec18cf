"""Few-shot metric functions with seqio's conventions.

Every function takes ``(targets, scores)`` or ``(targets, predictions)`` as its only positional
arguments (what ``seqio.Task(metric_fns=...)`` inspects) and returns a dict of floats. Values are
percentages in [0, 100], like t5's metrics.

* ``rank_classification(targets, scores)``: multiple choice by log-likelihood. One row per
  (question, choice); ``targets[i]`` is a ``RankTarget`` (or dict / tuple with ``idx``,
  ``is_correct``, ``num_tokens``) and ``scores[i]`` the summed log-likelihood of that choice's
  continuation. The highest-scoring choice of each question is its prediction (ties: the first
  row). Returns ``accuracy`` (sum of log-likelihoods) and ``accuracy_norm`` (log-likelihood divided
  by the continuation's token count).
* ``exact_match`` / ``token_f1(targets, predictions)``: ``targets[i]`` is an answer or a sequence of
  acceptable answers; the best match counts (SQuAD style). ``normalize="squad"`` lowercases and
  drops punctuation, articles and extra whitespace; ``normalize="code"`` only collapses whitespace
  (and F1 then counts identifier and punctuation tokens).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_CODE_TOKENS = re.compile(r"\w+|[^\w\s]", re.UNICODE)
NORMALIZATIONS = ("squad", "code")


@dataclasses.dataclass(frozen=True)
class RankTarget:
  """One (question, choice) row of a rank-classification task."""

  idx: int
  is_correct: bool
  num_tokens: int


def _as_rank_target(target: Any) -> RankTarget:
  if isinstance(target, RankTarget):
    return target
  if isinstance(target, Mapping):
    return RankTarget(int(target["idx"]), bool(target["is_correct"]), int(target["num_tokens"]))
  idx, is_correct, num_tokens = target
  return RankTarget(int(idx), bool(is_correct), int(num_tokens))


def rank_classification(targets: Sequence[Any], scores: Sequence[float]) -> dict[str, float]:
  """Accuracy of picking the most likely choice (summed and length-normalised log-likelihood).

  Args:
    targets: one per row: ``RankTarget`` / ``{"idx", "is_correct", "num_tokens"}`` /
      ``(idx, is_correct, num_tokens)``. Rows of a question share ``idx``; a question may have
      several correct rows (ReCoRD) or none (then it counts as wrong).
    scores: summed log-likelihood of each row's continuation.
  Returns:
    {"accuracy": %, "accuracy_norm": %} over questions.
  """
  if len(targets) != len(scores):
    raise ValueError(f"rank_classification got {len(targets)} targets but {len(scores)} scores.")
  questions: dict[int, list[tuple[float, float, bool]]] = collections.OrderedDict()
  for target, score in zip(targets, scores):
    t = _as_rank_target(target)
    score = float(score)
    questions.setdefault(t.idx, []).append((score, score / max(t.num_tokens, 1), t.is_correct))
  if not questions:
    return {"accuracy": 0.0, "accuracy_norm": 0.0}
  hits = np.array(
    [
      [rows[int(np.argmax([r[0] for r in rows]))][2], rows[int(np.argmax([r[1] for r in rows]))][2]]
      for rows in questions.values()
    ],
    np.float64,
  )
  return {"accuracy": 100.0 * hits[:, 0].mean(), "accuracy_norm": 100.0 * hits[:, 1].mean()}


def rank_classification_chance(targets: Sequence[Any]) -> float:
  """Expected accuracy (%) of picking a choice uniformly at random: mean of #correct / #choices."""
  counts: dict[int, list[int]] = collections.OrderedDict()
  for target in targets:
    t = _as_rank_target(target)
    c = counts.setdefault(t.idx, [0, 0])
    c[0] += int(t.is_correct)
    c[1] += 1
  if not counts:
    return 0.0
  return 100.0 * float(np.mean([c / n for c, n in counts.values()]))


# ------------------------------------------------------------------------------- generation
def normalize_answer(text: str, normalize: str = "squad") -> str:
  """SQuAD normalisation (lowercase, no punctuation/articles, single spaces) or code (whitespace)."""
  if normalize == "code":
    return " ".join(text.split())
  if normalize != "squad":
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}.")
  text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str, normalize: str) -> list[str]:
  text = normalize_answer(text, normalize)
  return _CODE_TOKENS.findall(text) if normalize == "code" else text.split()


def _answers(target: Any) -> list[str]:
  if isinstance(target, bytes):
    return [target.decode("utf-8")]
  if isinstance(target, str):
    return [target]
  answers = [a.decode("utf-8") if isinstance(a, bytes) else str(a) for a in target]
  return answers


def _f1(prediction: str, answer: str, normalize: str) -> float:
  pred, gold = _tokens(prediction, normalize), _tokens(answer, normalize)
  if not pred or not gold:
    return float(pred == gold)
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def _check(targets: Sequence[Any], predictions: Sequence[str], name: str) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{name} got {len(targets)} targets but {len(predictions)} predictions.")


def exact_match(
  targets: Sequence[Any], predictions: Sequence[str], normalize: str = "squad"
) -> dict[str, float]:
  """{"exact_match": %}: prediction equals one of the answers after normalisation."""
  _check(targets, predictions, "exact_match")
  if not targets:
    return {"exact_match": 0.0}
  hits = [
    max(normalize_answer(p, normalize) == normalize_answer(a, normalize) for a in _answers(t))
    if _answers(t)
    else False
    for t, p in zip(targets, predictions)
  ]
  return {"exact_match": 100.0 * float(np.mean(hits))}


def token_f1(
  targets: Sequence[Any], predictions: Sequence[str], normalize: str = "squad"
) -> dict[str, float]:
  """{"f1": %}: best token-overlap F1 of the prediction against the answers (SQuAD style)."""
  _check(targets, predictions, "token_f1")
  if not targets:
    return {"f1": 0.0}
  f1s = [
    max((_f1(p, a, normalize) for a in _answers(t)), default=0.0)
    for t, p in zip(targets, predictions)
  ]
  return {"f1": 100.0 * float(np.mean(f1s))}


def code_exact_match(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """``exact_match`` with whitespace-only normalisation (for code)."""
  return exact_match(targets, predictions, normalize="code")


def code_token_f1(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """``token_f1`` over identifier / punctuation tokens (for code)."""
  return token_f1(targets, predictions, normalize="code")
