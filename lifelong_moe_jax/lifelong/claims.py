"""The Lifelong-MoE claims, checked on a lifelong report (``report.json``).

``evaluate_claims(report)`` returns one ``Claim`` per statement of the paper that a study can
test, with the measured values and pass/fail (``None`` when the report lacks what the claim
needs, e.g. a method that was not run):

1. ``retention``: lifelong_moe's perplexity on the first distribution at the end is within 5% of
   its value right after the first phase, while finetune's is at least 20% worse.
2. ``adaptation``: lifelong_moe's perplexity on the last distribution is within 5% of finetune's.
3. ``best_without_old_data``: lifelong_moe has the best token-weighted mean final NLL among the
   methods that use no old data (all but multitask and replay); its gap to multitask is stated.
4. ``routing``: the experts added in a phase carry at least half of that phase's distribution's
   top-1 assignments, and at most 10% of the earlier distributions' top-1 assignments drift to
   them (phase results' ``routing`` entries, see ``eval/routing_analysis.py``).

A failing claim is a finding to report with its numbers, not something to tune away.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

USES_OLD_DATA = ("multitask", "replay")
RETENTION_TOLERANCE = 0.05
FINETUNE_FORGETTING = 0.20
ADAPTATION_TOLERANCE = 0.05
NEW_EXPERT_SHARE = 0.5
MAX_DRIFT = 0.10


@dataclasses.dataclass(frozen=True)
class Claim:
  """One checked statement: ``passed`` is None when the report cannot decide it."""

  name: str
  statement: str
  measured: str
  passed: bool | None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def token_weighted_nll(
  eval_results: Mapping[str, Mapping[str, float]], tasks: Sequence[str]
) -> float | None:
  """Mean NLL per token over ``tasks``, each weighted by its evaluated token count."""
  total = tokens = 0.0
  for task in tasks:
    values = eval_results.get(task)
    if not values or not values.get("num_tokens"):
      return None
    total += values["loss"] * values["num_tokens"]
    tokens += values["num_tokens"]
  return total / tokens if tokens else None


def relative_change(before: float | None, after: float | None) -> float | None:
  """``after / before - 1`` (e.g. +0.2 = 20% worse perplexity); None if either is missing."""
  if before is None or after is None or before == 0:
    return None
  return after / before - 1.0


def _pct(value: float | None) -> str:
  return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.1f}%"


def _complete(report: Mapping[str, Any], method: str) -> Mapping[str, Any] | None:
  m = report["methods"].get(method)
  return m if m and m.get("complete") else None


def _retention(report: Mapping[str, Any]) -> Claim:
  first_task = report["phase_tasks"][0][0]
  statement = (
    f"lifelong_moe's {first_task} perplexity at the end is within "
    f"{RETENTION_TOLERANCE:.0%} of its value after phase A; finetune's is at least "
    f"{FINETUNE_FORGETTING:.0%} worse"
  )
  ours, ft = _complete(report, "lifelong_moe"), _complete(report, "finetune")
  if ours is None or ft is None:
    return Claim("retention", statement, "lifelong_moe or finetune did not run", None)
  ppl_ours, ppl_ft = ours["perplexity"][first_task], ft["perplexity"][first_task]
  ours_change = relative_change(ppl_ours[0], ppl_ours[-1])
  ft_change = relative_change(ppl_ft[0], ppl_ft[-1])
  measured = (
    f"lifelong_moe {ppl_ours[0]:.1f} -> {ppl_ours[-1]:.1f} ({_pct(ours_change)}); "
    f"finetune {ppl_ft[0]:.1f} -> {ppl_ft[-1]:.1f} ({_pct(ft_change)})"
  )
  return Claim(
    "retention",
    statement,
    measured,
    ours_change <= RETENTION_TOLERANCE and ft_change >= FINETUNE_FORGETTING,
  )


def _adaptation(report: Mapping[str, Any]) -> Claim:
  last_task = report["phase_tasks"][-1][0]
  statement = (
    f"lifelong_moe's {last_task} perplexity at the end is within "
    f"{ADAPTATION_TOLERANCE:.0%} of finetune's"
  )
  ours, ft = _complete(report, "lifelong_moe"), _complete(report, "finetune")
  if ours is None or ft is None:
    return Claim("adaptation", statement, "lifelong_moe or finetune did not run", None)
  a, b = ours["final_perplexity"][last_task], ft["final_perplexity"][last_task]
  gap = relative_change(b, a)
  return Claim(
    "adaptation",
    statement,
    f"lifelong_moe {a:.1f} vs finetune {b:.1f} ({_pct(gap)})",
    gap <= ADAPTATION_TOLERANCE,
  )


def final_nll_by_method(report: Mapping[str, Any]) -> dict[str, float]:
  """Token-weighted mean final NLL over every evaluated distribution, per complete method."""
  out = {}
  for name, m in report["methods"].items():
    if m.get("complete"):
      value = token_weighted_nll(m["phases"][-1]["eval"], report["eval_tasks"])
      if value is not None:
        out[name] = value
  return out


def _best_without_old_data(report: Mapping[str, Any]) -> Claim:
  statement = (
    "lifelong_moe has the best token-weighted mean final NLL among the methods that use "
    "no old data; its gap to multitask is stated"
  )
  nll = final_nll_by_method(report)
  candidates = {k: v for k, v in nll.items() if k not in USES_OLD_DATA}
  if "lifelong_moe" not in candidates or len(candidates) < 2:
    return Claim(
      "best_without_old_data",
      statement,
      "needs lifelong_moe and at least one other method without old data",
      None,
    )
  ranking = sorted(candidates.items(), key=lambda kv: kv[1])
  measured = ", ".join(f"{k} {v:.4f}" for k, v in ranking)
  if "multitask" in nll:
    measured += (
      f"; multitask {nll['multitask']:.4f} (gap {nll['lifelong_moe'] - nll['multitask']:+.4f})"
    )
  else:
    measured += "; multitask not run"
  return Claim("best_without_old_data", statement, measured, ranking[0][0] == "lifelong_moe")


def _routing(report: Mapping[str, Any]) -> Claim:
  statement = (
    f"new experts carry >= {NEW_EXPERT_SHARE:.0%} of their phase's distribution's top-1 "
    f"assignments and <= {MAX_DRIFT:.0%} of earlier distributions' drift to them"
  )
  ours = _complete(report, "lifelong_moe")
  if ours is None or not all(p.get("routing") for p in ours["phases"]):
    return Claim("routing", statement, "no routing analysis in the report", None)
  names, phase_tasks = report["phase_names"], report["phase_tasks"]
  parts, ok = [], True
  for i in range(1, len(names)):
    routing = ours["phases"][i]["routing"]
    own = [routing[t]["top1"].get(names[i], 0.0) for t in phase_tasks[i] if t in routing]
    old = [
      routing[t]["top1"].get(names[i], 0.0)
      for j in range(i)
      for t in phase_tasks[j]
      if t in routing
    ]
    own_share, drift = (min(own) if own else None), (max(old) if old else None)
    parts.append(
      f"after {names[i]}: new experts take {_pct(own_share).lstrip('+')} of its "
      f"tokens' top-1, {_pct(drift).lstrip('+')} of older distributions' (max)"
    )
    ok = (
      ok
      and own_share is not None
      and own_share >= NEW_EXPERT_SHARE
      and (drift is None or drift <= MAX_DRIFT)
    )
  return Claim("routing", statement, "; ".join(parts), ok)


def evaluate_claims(report: Mapping[str, Any]) -> list[Claim]:
  """Every claim, in the order of the module docstring."""
  return [_retention(report), _adaptation(report), _best_without_old_data(report), _routing(report)]


def claims_table(claims: Sequence[Claim]) -> list[str]:
  """A Markdown table: claim, measured, verdict."""
  verdict = {True: "pass", False: "**fail**", None: "not measured"}
  lines = ["| claim | measured | result |", "|---|---|---|"]
  lines += [f"| {c.statement} | {c.measured} | {verdict[c.passed]} |" for c in claims]
  return lines
