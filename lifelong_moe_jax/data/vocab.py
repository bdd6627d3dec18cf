"""The project's vocabulary: one SentencePiece model trained offline over all prepared distributions.

- `train_vocabulary(...)` (called by `prepare`) samples a fixed, deterministic slice of each
  distribution's train split and trains a unigram SentencePiece model with T5 conventions
  (pad=0, eos=1, unk=2, no bos), byte fallback (unseen scripts still encode, as byte pieces), identity
  normalisation and kept whitespace (so Python indentation survives a round trip). It is stored at
  `DIR/vocab/spm.model` with `DIR/vocab/COMPLETE.json` written last.
- `get_vocabulary(kind="sentencepiece" | "byte")` returns a `seqio.Vocabulary`; gin-configurable, so a
  run can select `get_vocabulary.kind = "byte"`.
- `LazyVocabulary` is what the tasks register: it calls `get_vocabulary()` at first use, so neither the
  data dir nor the gin choice is frozen at `import tasks`. `shared_vocabulary()` is the one instance
  that every task of this project registers (corpus tasks and few-shot tasks alike), so mixtures of
  them compare vocabularies equal by identity without resolving them.
- `vocabulary_fingerprint` / `check_vocabulary_fingerprint`: the trainer stores the fingerprint in its
  checkpoints and refuses a checkpoint trained with another vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import shutil
from typing import Any, Mapping, Sequence

import gin
import seqio
from absl import logging

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import shards

MODEL_FILE = "spm.model"
DEFAULT_VOCAB_SIZE = 8000
DEFAULT_SAMPLE_BYTES = 1_000_000  # per distribution; 3 MB total keeps training well under a minute
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
VOCAB_FORMAT_VERSION = 2
_PREPARE_HINT = "python -m lifelong_moe_jax.data.prepare --data_dir {}"


def model_path(data_dir: str | None = None) -> str:
  """`DIR/vocab/spm.model`."""
  return os.path.join(data_dir_lib.vocab_dir(data_dir), MODEL_FILE)


# ------------------------------------------------------------------------------------------- train
def _sample_lines(dist_dir: str, budget_bytes: int) -> list[str]:
  """Every k-th train document of a prepared distribution (k chosen so ~budget_bytes are taken),
  cut into non-empty lines (SentencePiece treats input lines as sentences)."""
  marker = shards.verify_distribution(dist_dir, check_sha256=False)
  total = marker["splits"]["train"]["text_bytes"]
  stride = max(1, math.ceil(total / max(budget_bytes, 1)))
  lines: list[str] = []
  taken = 0
  paths = shards.split_files(dist_dir, "train", marker)
  for index, (_, _, text) in enumerate(shards.iter_documents(paths)):
    if index % stride:
      continue
    for line in text.split("\n"):
      if line.strip():
        lines.append(line.rstrip())
        taken += len(line.encode("utf-8"))
    if taken >= budget_bytes:
      break
  return lines


def _marker_digest(dist_dir: str) -> str:
  return shards.file_sha256(os.path.join(dist_dir, shards.MARKER))


@dataclasses.dataclass(frozen=True)
class VocabResult:
  """Outcome of `train_vocabulary`: status is "built" or "reused"."""

  status: str
  path: str
  marker: Mapping[str, Any]


def train_vocabulary(
  distributions: Sequence[str],
  data_dir: str | None = None,
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  sample_bytes: int = DEFAULT_SAMPLE_BYTES,
  num_threads: int = 2,
  force: bool = False,
) -> VocabResult:
  """Trains (or reuses) `DIR/vocab/spm.model` over a sample of the given prepared distributions.

  Args:
    distributions: prepared distribution names whose train splits are sampled (sorted for determinism).
    data_dir: data dir (resolved as everywhere).
    vocab_size: number of pieces, including pad/eos/unk and the 256 byte-fallback pieces.
    sample_bytes: text bytes sampled per distribution.
    num_threads: SentencePiece trainer threads.
    force: retrain even if a matching model exists.

  Returns:
    VocabResult; the model is reused when its marker records the same settings and the same
    distribution builds (sha256 of their markers) and the model file matches its sha256.
  """
  spm = _require_sentencepiece()
  out_dir = data_dir_lib.vocab_dir(data_dir)
  names = sorted(distributions)
  config = {
    "format_version": VOCAB_FORMAT_VERSION,
    "vocab_size": vocab_size,
    "sample_bytes": sample_bytes,
    "distributions": {n: _marker_digest(data_dir_lib.distribution_dir(n, data_dir)) for n in names},
    "sentencepiece": spm.__version__,
  }
  marker_path = os.path.join(out_dir, shards.MARKER)
  if not force and os.path.exists(marker_path):
    try:
      with open(marker_path, encoding="utf-8") as f:
        old = json.load(f)
      if old.get("config") == config and shards.file_sha256(
        os.path.join(out_dir, MODEL_FILE)
      ) == old.get("model_sha256"):
        return VocabResult("reused", os.path.join(out_dir, MODEL_FILE), old)
      logging.info("Vocabulary at %s was trained on other data or settings; retraining.", out_dir)
    except (OSError, ValueError) as e:
      logging.warning("Vocabulary at %s is incomplete (%s); retraining.", out_dir, e)

  lines: list[str] = []
  for n in names:
    lines += _sample_lines(data_dir_lib.distribution_dir(n, data_dir), sample_bytes)
  model = io.BytesIO()
  # Trained from an iterator into memory, so no file path ends up inside the model proto and the
  # same sample gives byte-identical models (hence fingerprints) in any data dir.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines),
    model_writer=model,
    vocab_size=vocab_size,
    model_type="unigram",
    byte_fallback=True,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=0.9995,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=16384,
    hard_vocab_limit=False,
    num_threads=num_threads,
    minloglevel=2,
  )
  sample_digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
  partial = out_dir.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  with open(os.path.join(partial, MODEL_FILE), "wb") as f:
    f.write(model.getvalue())
  marker = {
    "config": config,
    "model_sha256": hashlib.sha256(model.getvalue()).hexdigest(),
    "sample_sha256": sample_digest,
    "sample_lines": len(lines),
  }
  with open(os.path.join(partial, shards.MARKER), "w", encoding="utf-8") as f:
    json.dump(marker, f, indent=1, sort_keys=True)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(partial, out_dir)
  _clear_caches()
  return VocabResult("built", os.path.join(out_dir, MODEL_FILE), marker)


def _require_sentencepiece():
  try:
    import sentencepiece  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("sentencepiece is required to train the vocabulary: pip install -e .") from e
  return sentencepiece


def _clear_caches() -> None:
  """Forgets loaded models, so a model retrained at the same path in this process is reloaded."""
  _sentencepiece_vocabulary.cache_clear()
  # seqio memoises parsed models by file path.
  internal = getattr(seqio.vocabularies, "_load_model_internal", None)
  if internal is not None and hasattr(internal, "cache_clear"):
    internal.cache_clear()


# ------------------------------------------------------------------------------------------- access
@functools.lru_cache(maxsize=16)
def _sentencepiece_vocabulary(path: str, stamp: tuple[int, int]) -> seqio.SentencePieceVocabulary:
  del stamp  # cache key only
  return seqio.SentencePieceVocabulary(path)


@gin.configurable
def get_vocabulary(
  kind: str = "sentencepiece",
  data_dir: str | None = None,
  sentencepiece_model_file: str | None = None,
) -> seqio.Vocabulary:
  """Returns the vocabulary for `kind`.

  Args:
    kind: "sentencepiece" (the model `prepare` trained, `DIR/vocab/spm.model`) or "byte"
      (`seqio.ByteVocabulary()`: 259 ids, no training needed).
    data_dir: data dir holding `vocab/spm.model` (resolved as everywhere when None).
    sentencepiece_model_file: use this SentencePiece model instead of the prepared one (e.g. a
      cluster-wide model); it must follow T5 conventions (pad=0, eos=1, unk=2).

  Raises:
    FileNotFoundError: the prepared model is missing (the message gives the prepare command).
    ValueError: unknown kind.
  """
  if kind == "byte":
    return seqio.ByteVocabulary()
  if kind != "sentencepiece":
    raise ValueError(f"Unknown vocabulary kind {kind!r}; use 'sentencepiece' or 'byte'.")
  path = sentencepiece_model_file or model_path(data_dir)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"SentencePiece model {path} not found. Build it with: "
      f"{_PREPARE_HINT.format(data_dir_lib.resolve_data_dir(data_dir))} "
      "(or select the byte vocabulary in gin: get_vocabulary.kind = 'byte')."
    )
  st = os.stat(path)
  return _sentencepiece_vocabulary(os.path.abspath(path), (st.st_mtime_ns, st.st_size))


class LazyVocabulary(seqio.Vocabulary):
  """A `seqio.Vocabulary` that resolves `get_vocabulary(**kwargs)` (gin-configured) at each use.

  Tasks are registered at import time, before CLIs parse gin or pick a data dir; this wrapper defers
  both choices to dataset-build time. All vocabulary methods delegate to the resolved vocabulary.
  Two LazyVocabulary objects are equal when they resolve to equal vocabularies; one instance is
  shared by all tasks, so mixtures compare it by identity without resolving it.
  """

  def __init__(self, **get_vocabulary_kwargs: Any):
    super().__init__(extra_ids=0)
    self._kwargs = dict(get_vocabulary_kwargs)

  def resolve(self) -> seqio.Vocabulary:
    """The concrete vocabulary for the current gin config and data dir."""
    return get_vocabulary(**self._kwargs)

  @property
  def bos_id(self):
    return self.resolve().bos_id

  @property
  def eos_id(self):
    return self.resolve().eos_id

  @property
  def pad_id(self) -> int:
    return self.resolve().pad_id

  @property
  def unk_id(self):
    return self.resolve().unk_id

  @property
  def extra_ids(self) -> int:
    return self.resolve().extra_ids

  @property
  def vocab_size(self) -> int:
    return self.resolve().vocab_size

  @property
  def _base_vocab_size(self) -> int:
    return self.resolve()._base_vocab_size  # pylint: disable=protected-access

  def encode(self, s):
    return self.resolve().encode(s)

  def decode(self, ids):
    return self.resolve().decode(ids)

  def encode_tf(self, s):
    return self.resolve().encode_tf(s)

  def decode_tf(self, ids):
    return self.resolve().decode_tf(ids)

  def _encode(self, s):
    return self.resolve()._encode(s)  # pylint: disable=protected-access

  def _decode(self, ids):
    return self.resolve()._decode(ids)  # pylint: disable=protected-access

  def _encode_tf(self, s):
    return self.resolve()._encode_tf(s)  # pylint: disable=protected-access

  def _decode_tf(self, ids):
    return self.resolve()._decode_tf(ids)  # pylint: disable=protected-access

  def __eq__(self, other):
    if other is self:
      return True
    other = other.resolve() if isinstance(other, LazyVocabulary) else other
    return isinstance(other, seqio.Vocabulary) and self.resolve() == other

  __hash__ = object.__hash__

  def __str__(self) -> str:
    return f"LazyVocabulary({self._kwargs or 'get_vocabulary() from gin'})"

  __repr__ = __str__


@functools.lru_cache(maxsize=None)
def shared_vocabulary() -> LazyVocabulary:
  """The process-wide `LazyVocabulary` (gin-configured `get_vocabulary()`) all tasks register.

  seqio mixtures require their tasks' vocabularies to be equal; sharing one instance makes that an
  identity check, so registering a mixture never resolves (loads) the vocabulary.
  """
  return LazyVocabulary()


# -------------------------------------------------------------------------------------- fingerprint
def vocabulary_fingerprint(vocab: seqio.Vocabulary) -> str:
  """A string identifying the vocabulary's token mapping.

  "sentencepiece:sha256=<hex>:extra_ids=<n>" (hash of the serialized model proto) or
  "byte:extra_ids=<n>"; other vocabularies fall back to "<ClassName>:vocab_size=<n>".
  """
  if isinstance(vocab, LazyVocabulary):
    vocab = vocab.resolve()
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return f"sentencepiece:sha256={hashlib.sha256(vocab.sp_model).hexdigest()}:extra_ids={vocab.extra_ids}"
  if isinstance(vocab, seqio.ByteVocabulary):
    return f"byte:extra_ids={vocab.extra_ids}"
  return f"{type(vocab).__name__}:vocab_size={vocab.vocab_size}"


def check_vocabulary_fingerprint(expected: str, actual: str) -> None:
  """Raises ValueError when a checkpoint's vocabulary (`expected`) differs from the current one."""
  if expected != actual:
    raise ValueError(
      "Vocabulary mismatch: the checkpoint was trained with vocabulary "
      f"'{expected}' but the current vocabulary is '{actual}'. Token ids would mean different "
      "things. Use the data dir / vocabulary the checkpoint was trained with (gin: "
      "get_vocabulary.kind, configured_data_dir.data_dir), or start from a fresh model dir."
    )
