"""The claim quantities over replicate runs: one lifelong schedule run with several seeds.

A single run cannot say whether a 0.02-nats gap between two methods is a property of the methods or
of the seed (param init, data order, surgery noise, teacher samples: ``LifelongSchedule.seed``).
Given the ``report.json`` dicts of replicate runs (same phases and methods, different seeds),

- ``method_spreads`` gives, per method complete in every run, each ``claims.method_summary``
  quantity's per-run values, mean, sample standard deviation, minimum and maximum;
- ``paired_differences`` gives, per method, the per-run difference of one quantity to a reference
  method *of the same run* (the same phase-A checkpoint, so the phase-A seed cancels), with its mean
  and spread and the number of runs in which the method is lower;
- ``nll_ranks`` ranks the methods by final NLL in each run;
- ``summarize`` computes all of them once, ``spread_tables`` renders that as Markdown.

``benchmarks/seed_spread.py`` is the command line (JSON, Markdown and a PNG).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Mapping, Sequence

from lifelong_moe_jax.lifelong import claims

QUANTITIES = ("retention", "adaptation_gap", "final_nll", "new_share", "max_drift")
LABELS = {
  "retention": "first dist. ppl change",
  "adaptation_gap": "last dist. vs finetune",
  "final_nll": "final NLL",
  "new_share": "new experts' top-1 share",
  "max_drift": "drift to new (max)",
}
PERCENT = frozenset({"retention", "adaptation_gap", "new_share", "max_drift"})
PAIRED_QUANTITIES = ("final_nll", "retention")


class ReplicateError(ValueError):
  """Reports that are not replicates of one schedule."""


@dataclasses.dataclass(frozen=True)
class Spread:
  """Values of one quantity over runs (in run order) and their summary statistics."""

  values: tuple[float, ...]
  mean: float
  std: float  # sample standard deviation (n - 1); 0.0 for a single value
  low: float
  high: float

  @classmethod
  def of(cls, values: Sequence[float]) -> Spread:
    vals = tuple(float(v) for v in values)
    if not vals:
      raise ValueError("Spread.of needs at least one value.")
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return cls(vals, statistics.fmean(vals), std, min(vals), max(vals))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def seeds(reports: Sequence[Mapping[str, Any]]) -> list[int]:
  """The schedule seed of each report."""
  return [int(r["schedule"]["seed"]) for r in reports]


def check_replicates(reports: Sequence[Mapping[str, Any]]) -> None:
  """Raises ``ReplicateError`` unless the reports are at least two runs of the same phases and
  distributions (seeds may repeat: two runs of one seed measure the run-to-run noise)."""
  if len(reports) < 2:
    raise ReplicateError(f"Give at least two replicate runs (got {len(reports)}).")
  first = reports[0]
  for i, r in enumerate(reports[1:], start=1):
    for key in ("phase_tasks", "eval_tasks"):
      if r[key] != first[key]:
        raise ReplicateError(
          f"Run {i} has {key} {r[key]} but run 0 has {first[key]}: replicates must run the same "
          "schedule with different seeds (LifelongSchedule.seed)."
        )


def common_methods(
  reports: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None
) -> list[str]:
  """``methods`` (default: every method of the first report, in its order) that are complete in
  every report; raises ``ReplicateError`` naming a requested method missing from a run."""
  names = list(methods) if methods else list(reports[0]["methods"])
  common = []
  for name in names:
    missing = [i for i, r in enumerate(reports) if claims.method_summary(r, name) is None]
    if missing and methods:
      raise ReplicateError(
        f"Method {name!r} is not complete in run(s) {missing}: finish those runs or leave it out."
      )
    if not missing:
      common.append(name)
  return common


def method_spreads(
  reports: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None
) -> dict[str, dict[str, Spread]]:
  """Per method complete in every run: ``{quantity: Spread}`` for each ``QUANTITIES`` entry
  measured in every run (e.g. no routing quantities for a method that does not expand)."""
  check_replicates(reports)
  out: dict[str, dict[str, Spread]] = {}
  for name in common_methods(reports, methods):
    summaries = [claims.method_summary(r, name) for r in reports]
    out[name] = {
      q: Spread.of([s[q] for s in summaries])
      for q in QUANTITIES
      if all(s[q] is not None for s in summaries)
    }
  return out


def paired_differences(
  spreads: Mapping[str, Mapping[str, Spread]], reference: str, quantity: str = "final_nll"
) -> dict[str, dict[str, Any]]:
  """Per method of ``spreads`` (``method_spreads``) other than ``reference``: ``{"difference":
  Spread of (method - reference) per run, "lower_in": runs where the method's value is lower}``
  for ``quantity``."""
  if reference not in spreads or quantity not in spreads[reference]:
    raise ReplicateError(
      f"The reference method {reference!r} has no {quantity!r} in every run; pick one of "
      f"{sorted(n for n, s in spreads.items() if quantity in s)}."
    )
  ref = spreads[reference][quantity].values
  out = {}
  for name, by_quantity in spreads.items():
    if name == reference or quantity not in by_quantity:
      continue
    diffs = [v - r for v, r in zip(by_quantity[quantity].values, ref)]
    out[name] = {"difference": Spread.of(diffs), "lower_in": sum(d < 0 for d in diffs)}
  return out


def nll_ranks(spreads: Mapping[str, Mapping[str, Spread]]) -> list[list[str]]:
  """Per run, the methods of ``spreads`` (``method_spreads``) ordered by final NLL (best first)."""
  names = [n for n, by_q in spreads.items() if "final_nll" in by_q]
  runs = len(spreads[names[0]]["final_nll"].values) if names else 0
  return [sorted(names, key=lambda n: spreads[n]["final_nll"].values[i]) for i in range(runs)]


@dataclasses.dataclass(frozen=True)
class ReplicateSummary:
  """Everything ``spread_tables`` shows, computed once (``summarize``)."""

  seeds: list[int]
  spreads: dict[str, dict[str, Spread]]
  reference: str | None
  paired: dict[str, dict[str, dict[str, Any]]]  # {quantity: paired_differences(...)}
  ranks: list[list[str]]

  def to_dict(self) -> dict[str, Any]:
    return {
      "seeds": self.seeds,
      "spreads": {n: {q: s.to_dict() for q, s in by_q.items()} for n, by_q in self.spreads.items()},
      "reference": self.reference,
      "paired": {
        q: {
          n: {"difference": d["difference"].to_dict(), "lower_in": d["lower_in"]}
          for n, d in by_method.items()
        }
        for q, by_method in self.paired.items()
      },
      "ranks": self.ranks,
    }


def summarize(
  reports: Sequence[Mapping[str, Any]],
  reference: str | None = None,
  methods: Sequence[str] | None = None,
) -> ReplicateSummary:
  """Spreads, the paired ``PAIRED_QUANTITIES`` differences to ``reference`` (when given) and the
  per-run NLL ranking of replicate ``reports``."""
  spreads = method_spreads(reports, methods)
  paired = (
    {q: paired_differences(spreads, reference, q) for q in PAIRED_QUANTITIES} if reference else {}
  )
  return ReplicateSummary(seeds(reports), spreads, reference, paired, nll_ranks(spreads))


def _fmt(quantity: str, value: float, signed: bool = True) -> str:
  if quantity in PERCENT:
    return f"{100 * value:+.1f}%" if signed else f"{100 * value:.1f}%"
  return f"{value:+.3f}" if signed else f"{value:.3f}"


def _cell(quantity: str, s: Spread, signed: bool) -> str:
  sd = f"{100 * s.std:.1f}" if quantity in PERCENT else f"{s.std:.3f}"
  values = " / ".join(_fmt(quantity, v, signed) for v in s.values)
  return f"{_fmt(quantity, s.mean, signed)} ± {sd} ({values})"


def spread_tables(summary: ReplicateSummary) -> list[str]:
  """Markdown of a ``summarize`` result: the spread of every quantity per method ("mean ± sd (run
  values)"), the paired differences to the reference (when given) and the per-run NLL ranking."""
  runs = len(summary.seeds)
  lines = [
    f"Runs: {runs} (seeds {', '.join(map(str, summary.seeds))}); mean ± sample sd "
    "(per-run values in run order).",
    "",
    "| method | " + " | ".join(LABELS[q] for q in QUANTITIES) + " |",
    "|---|" + "---|" * len(QUANTITIES),
  ]
  for name, by_q in summary.spreads.items():
    cells = [
      _cell(q, by_q[q], signed=q not in ("final_nll", "new_share", "max_drift"))
      if q in by_q
      else "n/a"
      for q in QUANTITIES
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  for quantity, diffs in summary.paired.items():
    lines += [
      "",
      f"Paired {LABELS[quantity]} difference to {summary.reference} (same run, method minus "
      "reference):",
      "",
      "| method | difference | lower in |",
      "|---|---|---|",
    ]
    for name, d in diffs.items():
      lines.append(
        f"| {name} | {_cell(quantity, d['difference'], True)} | {d['lower_in']} of {runs} runs |"
      )
  lines += ["", "Final-NLL ranking per run (best first):", ""]
  for seed, order in zip(summary.seeds, summary.ranks):
    lines.append(f"- seed {seed}: " + " < ".join(order))
  return lines
