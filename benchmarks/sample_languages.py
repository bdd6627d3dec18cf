r"""Which languages do a run's teacher sample rows hold? (docs/study.md, pooled samples.)

  python benchmarks/sample_languages.py --run runs/study/lifelong_moe_contrast2_src_ts_rts1 \
      --data_dir ./data_study [--calibrate wiki_en,fortunes_intl] [--json out.json]

Reads every phase's ``teacher_samples.npz`` under ``--run`` (a method's run dir; one row per
phase folder), decodes each packed sequence (one segment of a row) with the data dir's vocabulary
and classifies it by script and stop words: Cyrillic -> Russian, CJK -> Chinese, Latin -> German
when German stop words and umlauts outnumber English stop words, else English. It prints, per
phase, the share of the decoded characters in each language. ``--calibrate`` prints the same
shares for prepared distributions' validation text (names of ``--data_dir``'s folders), so the
classifier's error on known text sits next to the samples' numbers.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
from collections.abc import Iterable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import numpy as np  # pylint: disable=g-import-not-at-top

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.lifelong import pseudo_rehearsal

LANGUAGES = ("en", "de", "ru", "zh", "other")
_EN_WORDS = frozenset(
  "the and is not i a an to with of in on for it you he she we that this are was be".split()
)
_DE_WORDS = frozenset(
  "der die das und ist nicht ich ein eine zu mit sich auf für den dem des von wie auch es sie er "
  "wir".split()
)
_CYRILLIC = re.compile(r"[\u0400-\u04FF]")
_CJK = re.compile(r"[\u3000-\u9FFF\uFF00-\uFFEF]")
_LATIN = re.compile(r"[A-Za-zÄÖÜäöüß]")
_UMLAUT = re.compile(r"[äöüß]")
_WORD = re.compile(r"[a-zäöüß]+")
CALIBRATION_TEXTS = 500


def language(text: str) -> str:
  """The language of ``text`` (one of ``LANGUAGES``) by its dominant script, then stop words."""
  cyrillic, cjk, latin = (len(p.findall(text)) for p in (_CYRILLIC, _CJK, _LATIN))
  top = max(cyrillic, cjk, latin)
  if top == 0:
    return "other"
  if top == cyrillic:
    return "ru"
  if top == cjk:
    return "zh"
  lower = text.lower()
  words = _WORD.findall(lower)
  german = sum(w in _DE_WORDS for w in words) + 3 * len(_UMLAUT.findall(lower))
  english = sum(w in _EN_WORDS for w in words)
  return "de" if german > english else "en"


def language_shares(texts: Iterable[str]) -> dict[str, float]:
  """Share of the characters of ``texts`` in each language (sums to 1; zeros when empty)."""
  chars = dict.fromkeys(LANGUAGES, 0)
  for text in texts:
    chars[language(text)] += len(text)
  total = sum(chars.values())
  return {k: (v / total if total else 0.0) for k, v in chars.items()}


def decode_rows(rows: dict[str, np.ndarray], vocab) -> list[str]:
  """Every packed sequence of ``rows`` (``[num_rows, length]`` features), decoded: a row holds one
  sequence per segment id > 0; padding, EOS and BOS ids (< 2 after the specials) are dropped."""
  tokens, segments = rows["decoder_target_tokens"], rows["decoder_segment_ids"]
  texts = []
  for row_tokens, row_segments in zip(tokens, segments):
    for segment in np.unique(row_segments[row_segments > 0]):
      ids = [int(t) for t in row_tokens[row_segments == segment] if t > 1]
      texts.append(vocab.decode(ids))
  return texts


def validation_texts(name: str, data_dir: str, limit: int = CALIBRATION_TEXTS) -> list[str]:
  """The first ``limit`` validation documents of prepared distribution ``name``."""
  try:
    paths = shards.split_files(data_dir_lib.distribution_dir(name, data_dir), "validation")
  except shards.IncompleteBuildError as e:
    raise SystemExit(
      f"--calibrate {name}: {e} Name a prepared distribution (a folder of --data_dir)."
    ) from e
  return [text for _, _, text in itertools.islice(shards.iter_documents(paths), limit)]


def _row(label: str, count: str, shares: dict[str, float]) -> str:
  return f"| {label} | {count} | " + " | ".join(f"{100 * shares[k]:.1f}%" for k in LANGUAGES) + " |"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--run", required=True, help="a method's run dir (holds phase_* folders)")
  p.add_argument("--data_dir", default=None, help="prepared data dir (its vocabulary decodes)")
  p.add_argument("--calibrate", default="", help="comma-separated prepared distributions")
  p.add_argument("--json", default=None, help="also write the shares here")
  args = p.parse_args()
  paths = sorted(
    glob.glob(os.path.join(args.run, "phase_*", pseudo_rehearsal.SAMPLES_FILE)),
    key=lambda s: int(os.path.basename(os.path.dirname(s)).split("_")[1]),
  )
  if not paths:
    raise SystemExit(
      f"No phase_*/{pseudo_rehearsal.SAMPLES_FILE} under {args.run}: pass the run dir of a method "
      "that distils on teacher samples (MethodOptions.distill_inputs = 'teacher_samples')."
    )
  data_dir = data_dir_lib.resolve_data_dir(args.data_dir)
  vocab = vocab_lib.get_vocabulary(data_dir=data_dir)
  out = {"run": args.run, "phases": [], "calibration": []}
  lines = [
    "| rows | sequences | " + " | ".join(LANGUAGES) + " |",
    "|---" * (len(LANGUAGES) + 2) + "|",
  ]
  for name in [n for n in args.calibrate.split(",") if n]:
    texts = validation_texts(name, data_dir)
    shares = language_shares(texts)
    out["calibration"].append({"distribution": name, "texts": len(texts), "shares": shares})
    lines.append(_row(f"{name} validation (calibration)", str(len(texts)), shares))
  for path in paths:
    rows = pseudo_rehearsal.load_samples(os.path.dirname(path))
    texts = decode_rows(rows, vocab)
    shares = language_shares(texts)
    phase = os.path.basename(os.path.dirname(path))
    num_rows = len(rows["decoder_target_tokens"])
    out["phases"].append(
      {"phase": phase, "rows": num_rows, "sequences": len(texts), "shares": shares}
    )
    lines.append(_row(f"{phase} ({num_rows} rows)", str(len(texts)), shares))
  print("\n".join(lines))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
