r"""Builds the offline pretraining corpora, the vocabulary and their TFDS view.

    python -m lifelong_moe_jax.data.prepare [--data_dir DIR] \
        [--distributions wiki_en,code_py,dialog_en] [--vocab_size 8000] [--skip_vocab] [--force]

For each distribution: JSONL shards with train/validation splits in `DIR/<dist>/` and the completion
marker `DIR/<dist>/COMPLETE.json` (written last). Then one SentencePiece model over a fixed sample of
every complete built-in distribution in `DIR` (`DIR/vocab/spm.model`), then the TFDS datasets under
`DIR/tfds`. Deterministic and idempotent: complete builds are reused (reported as "reused"), half-written
or modified ones are detected by the marker's sizes/checksums and rebuilt. Sizes are printed.

Optional `fortunes_intl` (German/Russian/Chinese text) needs Debian packages; when they are missing it
is skipped with the `apt-get install` command to run (nothing is installed here). A missing pip package
of a default corpus is an error naming `pip install -e ".[corpora]"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence

from absl import logging

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import distributions as dist_lib
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.data import sources
from lifelong_moe_jax.data import vocab as vocab_lib


@dataclasses.dataclass
class PrepareReport:
  """What `prepare` did. `distributions` maps name -> "built" | "reused"; `skipped` name -> reason."""

  data_dir: str
  distributions: dict[str, str] = dataclasses.field(default_factory=dict)
  sizes: dict[str, dict[str, shards.SplitSummary]] = dataclasses.field(default_factory=dict)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  vocab_status: str | None = None
  vocab_path: str | None = None
  seconds: float = 0.0

  def table(self) -> str:
    """Human-readable summary (what the CLI prints)."""
    lines = [
      f"Data dir: {self.data_dir}",
      f"{'distribution':<15}{'status':<9}{'train docs':>11}{'train MB':>10}"
      f"{'valid docs':>11}{'valid MB':>10}{'shards':>8}",
    ]
    for name, status in self.distributions.items():
      tr, va = self.sizes[name]["train"], self.sizes[name]["validation"]
      lines.append(
        f"{name:<15}{status:<9}{tr.num_documents:>11}{tr.text_bytes / 1e6:>10.2f}"
        f"{va.num_documents:>11}{va.text_bytes / 1e6:>10.2f}"
        f"{f'{tr.num_shards}+{va.num_shards}':>8}"
      )
    for name, reason in self.skipped.items():
      lines.append(f"{name:<15}skipped  {reason}")
    if self.vocab_status:
      lines.append(f"{'vocabulary':<15}{self.vocab_status:<9}{self.vocab_path}")
    lines.append(f"Done in {self.seconds:.1f}s.")
    return "\n".join(lines)


def _complete_builtins(root: str) -> list[str]:
  done = []
  for name in dist_lib.DEFAULT_DISTRIBUTIONS + dist_lib.OPTIONAL_DISTRIBUTIONS:
    try:
      shards.verify_distribution(data_dir_lib.distribution_dir(name, root), check_sha256=False)
      done.append(name)
    except shards.IncompleteBuildError:
      pass
  return done


def optional_hint() -> str:
  """A line about the optional non-English distribution, printed after a default run."""
  try:
    sources.fortune_files()
  except sources.MissingDebianPackagesError as e:
    return (
      f"Optional non-English distribution 'fortunes_intl' is not built: {e}. Then add "
      "--distributions wiki_en,code_py,dialog_en,fortunes_intl"
    )
  return (
    "Optional non-English distribution 'fortunes_intl' is available: add it with "
    "--distributions wiki_en,code_py,dialog_en,fortunes_intl"
  )


def prepare(
  data_dir: str | None = None,
  distributions: Sequence[str] = dist_lib.DEFAULT_DISTRIBUTIONS,
  vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
  build_vocab: bool = True,
  vocab_distributions: Sequence[str] | None = None,
  materialize_tfds: bool = True,
  force: bool = False,
) -> PrepareReport:
  """Builds (or reuses) distributions, vocabulary and TFDS datasets; see the module docstring.

  Args:
    data_dir: target dir (resolved: argument > LIFELONG_MOE_DATA_DIR > ./data).
    distributions: names to build (built-in ones; see `dist_lib.known_distributions()`).
    vocab_size: SentencePiece pieces.
    build_vocab: train/reuse the vocabulary.
    vocab_distributions: distributions the vocabulary samples; default: every complete built-in
      distribution in the data dir after this run (so building one more distribution later retrains
      the vocabulary, and its fingerprint changes).
    materialize_tfds: also generate `DIR/tfds` (otherwise done lazily on first use).
    force: rebuild even complete builds.

  Returns:
    PrepareReport.

  Raises:
    sources.MissingPackageError: a default corpus's pip package is missing.
    ValueError: unknown distribution name.
  """
  start = time.time()
  root = data_dir_lib.resolve_data_dir(data_dir)
  with shards.dir_lock(root):
    report = _prepare_locked(
      root, distributions, vocab_size, build_vocab, vocab_distributions, materialize_tfds, force
    )
  report.seconds = time.time() - start
  return report


def _prepare_locked(
  root: str,
  distributions: Sequence[str],
  vocab_size: int,
  build_vocab: bool,
  vocab_distributions: Sequence[str] | None,
  materialize_tfds: bool,
  force: bool,
) -> PrepareReport:
  report = PrepareReport(data_dir=root)
  for name in distributions:
    spec = dist_lib.get_spec(name)
    if not spec.builtin:
      raise ValueError(
        f"'{name}' is not a built-in distribution; registered distributions are built on first use."
      )
    t0 = time.time()
    try:
      result = dist_lib.build_distribution(name, root, force=force)
    except sources.MissingDebianPackagesError as e:
      if name in dist_lib.DEFAULT_DISTRIBUTIONS:
        raise
      print(f"Skipping optional distribution {name}: {e}", flush=True)
      report.skipped[name] = f"missing Debian packages; run: {e.command}"
      continue
    report.distributions[name] = result.status
    report.sizes[name] = shards.summarize(result.marker)
    print(f"{name}: {result.status} in {time.time() - t0:.1f}s ({result.path})", flush=True)
  if build_vocab:
    names = list(vocab_distributions or _complete_builtins(root))
    if not names:
      raise ValueError(f"No prepared distribution in {root} to train the vocabulary on.")
    t0 = time.time()
    result = vocab_lib.train_vocabulary(names, root, vocab_size=vocab_size, force=force)
    report.vocab_status, report.vocab_path = result.status, result.path
    print(
      f"vocabulary over {','.join(sorted(names))}: {result.status} in {time.time() - t0:.1f}s",
      flush=True,
    )
  if materialize_tfds:
    from lifelong_moe_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel

    for name in report.distributions:
      tfds_builder.materialize(name, root)
  return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """CLI flags (argparse, so importing this module defines no global absl flags)."""
  known = dist_lib.DEFAULT_DISTRIBUTIONS + dist_lib.OPTIONAL_DISTRIBUTIONS
  parser = argparse.ArgumentParser(
    prog="python -m lifelong_moe_jax.data.prepare", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--data_dir",
    default=None,
    help=f"output dir (default: ${data_dir_lib.DATA_DIR_ENV}, else ./data)",
  )
  parser.add_argument(
    "--distributions",
    default=",".join(dist_lib.DEFAULT_DISTRIBUTIONS),
    help=f"comma-separated; known: {','.join(known)}",
  )
  parser.add_argument(
    "--vocab_size", type=int, default=vocab_lib.DEFAULT_VOCAB_SIZE, help="SentencePiece pieces"
  )
  parser.add_argument("--skip_vocab", action="store_true", help="do not train the vocabulary")
  parser.add_argument(
    "--skip_tfds", action="store_true", help="do not materialise DIR/tfds now (done on first use)"
  )
  parser.add_argument("--force", action="store_true", help="rebuild even complete builds")
  parser.add_argument("--verbose", action="store_true", help="absl INFO logging (TFDS details)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status."""
  os.environ.setdefault("NO_GCE_CHECK", "true")
  args = parse_args(argv)
  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  names = [n.strip() for n in args.distributions.split(",") if n.strip()]
  try:
    report = prepare(
      data_dir=args.data_dir,
      distributions=names,
      vocab_size=args.vocab_size,
      build_vocab=not args.skip_vocab,
      materialize_tfds=not args.skip_tfds,
      force=args.force,
    )
  except (sources.MissingPackageError, ValueError, FileNotFoundError) as e:
    print(f"prepare failed: {e}", file=sys.stderr)
    return 1
  print(report.table(), flush=True)
  if not set(dist_lib.OPTIONAL_DISTRIBUTIONS) & set(names):
    print(optional_hint(), flush=True)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("NO_GCE_CHECK", "true")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
