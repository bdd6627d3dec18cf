"""The Lifelong-MoE claims, checked on a lifelong report (``report.json``).

``evaluate_claims(report)`` returns one ``Claim`` per statement of the paper that a study can
test, with the measured values and pass/fail (``None`` when the report lacks what the claim
needs, e.g. a method that was not run):

1. ``retention``: lifelong_moe's perplexity on the first distribution at the end is within 5% of
   its value right after the first phase, while finetune's is at least 20% worse.
2. ``adaptation``: lifelong_moe's perplexity on the last distribution is within 5% of finetune's.
3. ``best_without_old_data``: lifelong_moe has the best token-weighted mean final NLL among the
   methods that use no old data (all but multitask, multitask_final, replay and variants that
   replay, ``uses_old_data``; the other variants of the method's own base excluded, variants of
   the baselines, e.g. a tuned EWC, included); its gaps to multitask and multitask_final are
   stated.
4. ``routing``: the experts added in a phase carry at least half of that phase's distribution's
   top-1 assignments, and at most 10% of the earlier distributions' top-1 assignments drift to
   them (phase results' ``routing`` entries, see ``eval/routing_analysis.py``).

``evaluate_claims(report, method)`` checks them for a variant of lifelong_moe
(``RunnerConfig.method_variants``); ``method_summary_table`` lists the claims' quantities for every
method of the report (the sweep behind the defaults).

A failing claim is a finding to report with its numbers, not something to tune away.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

USES_OLD_DATA = ("multitask", "multitask_final", "replay")
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


def _retention(report: Mapping[str, Any], method: str) -> Claim:
  first_task = report["phase_tasks"][0][0]
  statement = (
    f"{method}'s {first_task} perplexity at the end is within "
    f"{RETENTION_TOLERANCE:.0%} of its value after phase A; finetune's is at least "
    f"{FINETUNE_FORGETTING:.0%} worse"
  )
  ours, ft = _complete(report, method), _complete(report, "finetune")
  if ours is None or ft is None:
    return Claim("retention", statement, f"{method} or finetune did not run", None)
  ppl_ours, ppl_ft = ours["perplexity"][first_task], ft["perplexity"][first_task]
  ours_change = relative_change(ppl_ours[0], ppl_ours[-1])
  ft_change = relative_change(ppl_ft[0], ppl_ft[-1])
  measured = (
    f"{method} {ppl_ours[0]:.1f} -> {ppl_ours[-1]:.1f} ({_pct(ours_change)}); "
    f"finetune {ppl_ft[0]:.1f} -> {ppl_ft[-1]:.1f} ({_pct(ft_change)})"
  )
  return Claim(
    "retention",
    statement,
    measured,
    ours_change <= RETENTION_TOLERANCE and ft_change >= FINETUNE_FORGETTING,
  )


def _adaptation(report: Mapping[str, Any], method: str) -> Claim:
  last_task = report["phase_tasks"][-1][0]
  statement = (
    f"{method}'s {last_task} perplexity at the end is within "
    f"{ADAPTATION_TOLERANCE:.0%} of finetune's"
  )
  ours, ft = _complete(report, method), _complete(report, "finetune")
  if ours is None or ft is None:
    return Claim("adaptation", statement, f"{method} or finetune did not run", None)
  a, b = ours["final_perplexity"][last_task], ft["final_perplexity"][last_task]
  gap = relative_change(b, a)
  return Claim(
    "adaptation",
    statement,
    f"{method} {a:.1f} vs finetune {b:.1f} ({_pct(gap)})",
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


def _best_without_old_data(report: Mapping[str, Any], method: str) -> Claim:
  family = _base_of(report, method)
  statement = (
    f"{method} has the best token-weighted mean final NLL among the methods that use "
    f"no old data (other variants of {family} excluded; variants of the baselines count); its "
    "gap to multitask is stated"
  )
  nll = final_nll_by_method(report)
  candidates = {
    k: v
    for k, v in nll.items()
    if not uses_old_data(report, k)
    and (k == method or not (_is_variant(report, k) and _base_of(report, k) == family))
  }
  if method not in candidates or len(candidates) < 2:
    return Claim(
      "best_without_old_data",
      statement,
      f"needs {method} and at least one other method without old data",
      None,
    )
  ranking = sorted(candidates.items(), key=lambda kv: kv[1])
  measured = ", ".join(f"{k} {v:.4f}" for k, v in ranking)
  for ref in ("multitask", "multitask_final"):
    if ref in nll:
      measured += f"; {ref} {nll[ref]:.4f} (gap {nll[method] - nll[ref]:+.4f})"
  if not any(ref in nll for ref in ("multitask", "multitask_final")):
    measured += "; multitask not run"
  return Claim("best_without_old_data", statement, measured, ranking[0][0] == method)


def _is_variant(report: Mapping[str, Any], name: str) -> bool:
  spec = report["methods"].get(name, {}).get("spec") or {}
  return bool(spec.get("base") or spec.get("option_overrides"))


def _base_of(report: Mapping[str, Any], name: str) -> str:
  """The built-in method ``name`` is a variant of (``name`` itself for a built-in one)."""
  spec = report["methods"].get(name, {}).get("spec") or {}
  return spec.get("base") or name


def uses_old_data(report: Mapping[str, Any], name: str) -> bool:
  """Whether method ``name`` trains on earlier phases' data (joint training or replay, a variant's
  recipe flags included)."""
  spec = report["methods"].get(name, {}).get("spec") or {}
  return name in USES_OLD_DATA or bool(spec.get("replay") or spec.get("joint"))


def routing_shares(
  report: Mapping[str, Any], method: str
) -> list[tuple[str, float | None, float | None]] | None:
  """``[(phase, new experts' top-1 share of its own distribution (min over its tasks), largest
  top-1 share of an earlier distribution going to them)]`` for every phase after the first;
  None when the method has no routing analysis."""
  ours = _complete(report, method)
  if ours is None or not all(p.get("routing") for p in ours["phases"][1:]):
    return None
  names, phase_tasks = report["phase_names"], report["phase_tasks"]
  out = []
  for i in range(1, len(names)):
    routing = ours["phases"][i]["routing"]
    own = [routing[t]["top1"].get(names[i], 0.0) for t in phase_tasks[i] if t in routing]
    old = [
      routing[t]["top1"].get(names[i], 0.0)
      for j in range(i)
      for t in phase_tasks[j]
      if t in routing
    ]
    out.append((names[i], min(own) if own else None, max(old) if old else None))
  return out


def _routing(report: Mapping[str, Any], method: str) -> Claim:
  statement = (
    f"new experts carry >= {NEW_EXPERT_SHARE:.0%} of their phase's distribution's top-1 "
    f"assignments and <= {MAX_DRIFT:.0%} of earlier distributions' drift to them"
  )
  shares = routing_shares(report, method)
  if shares is None:
    return Claim("routing", statement, f"no routing analysis of {method} in the report", None)
  parts, ok = [], True
  for name, own_share, drift in shares:
    parts.append(
      f"after {name}: new experts take {_pct(own_share).lstrip('+')} of its "
      f"tokens' top-1, {_pct(drift).lstrip('+')} of older distributions' (max)"
    )
    ok = (
      ok
      and own_share is not None
      and own_share >= NEW_EXPERT_SHARE
      and (drift is None or drift <= MAX_DRIFT)
    )
  return Claim("routing", statement, "; ".join(parts), ok)


def evaluate_claims(report: Mapping[str, Any], method: str = "lifelong_moe") -> list[Claim]:
  """Every claim for ``method`` (lifelong_moe or a variant of it), in the order of the module
  docstring."""
  return [
    _retention(report, method),
    _adaptation(report, method),
    _best_without_old_data(report, method),
    _routing(report, method),
  ]


def method_summary(report: Mapping[str, Any], method: str) -> dict[str, Any] | None:
  """The claim quantities of one complete method: change of the first distribution's perplexity
  from phase A to the end, gap to finetune on the last distribution, token-weighted mean final
  NLL, the largest step-0 change on a distribution of an earlier phase, and the routing shares
  after the last phase (None where not measured)."""
  m = _complete(report, method)
  if m is None:
    return None
  first, last = report["phase_tasks"][0][0], report["phase_tasks"][-1][0]
  ft = _complete(report, "finetune")
  ppl = m["perplexity"][first]
  step0 = []
  for i, entry in enumerate(m.get("step0") or []):
    if entry:
      old = [t for j in range(i) for t in report["phase_tasks"][j]]
      step0 += [entry[t]["relative_change"] for t in old if t in entry]
  expands = bool((m.get("spec") or {}).get("expand"))
  shares = routing_shares(report, method) if expands else None
  return {
    "method": method,
    "option_overrides": (m.get("spec") or {}).get("option_overrides") or {},
    "replays": bool((m.get("spec") or {}).get("base")) and uses_old_data(report, method),
    "retention": relative_change(ppl[0], ppl[-1]),
    "adaptation_gap": (
      relative_change(ft["final_perplexity"][last], m["final_perplexity"][last]) if ft else None
    ),
    "final_nll": final_nll_by_method(report).get(method),
    "step0_max_old_change": max(step0) if step0 and expands else None,
    "new_share": shares[-1][1] if shares else None,
    "max_drift": max((d for _, _, d in shares if d is not None), default=None) if shares else None,
  }


def method_summary_table(report: Mapping[str, Any]) -> list[str]:
  """A Markdown table of ``method_summary`` for every complete method of the report."""
  lines = [
    "| method | options | first dist. ppl change | last dist. vs finetune | final NLL | "
    "step-0 change (old, max) | new experts' top-1 share (last phase) | drift to new (max) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name in report["methods"]:
    s = method_summary(report, name)
    if s is None:
      continue
    opts = (
      ", ".join(
        (["replay=True"] if s.get("replays") else [])
        + [f"{k}={v}" for k, v in sorted(s["option_overrides"].items())]
      )
      or "run's"
    )
    nll = "n/a" if s["final_nll"] is None else f"{s['final_nll']:.4f}"
    lines.append(
      f"| {name} | {opts} | {_pct(s['retention'])} | {_pct(s['adaptation_gap'])} | {nll} | "
      f"{_pct(s['step0_max_old_change'])} | {_pct(s['new_share']).lstrip('+')} | "
      f"{_pct(s['max_drift']).lstrip('+')} |"
    )
  return lines


def claims_table(claims: Sequence[Claim]) -> list[str]:
  """A Markdown table: claim, measured, verdict."""
  verdict = {True: "pass", False: "**fail**", None: "not measured"}
  lines = ["| claim | measured | result |", "|---|---|---|"]
  lines += [f"| {c.statement} | {c.measured} | {verdict[c.passed]} |" for c in claims]
  return lines
