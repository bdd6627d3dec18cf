"""The SentencePiece vocabulary: conventions, round trips, laziness, fingerprints, determinism."""

import hashlib
import os
import shutil

import pytest
import seqio

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import vocab


def test_t5_conventions_and_round_trips(prepared_data_dir):
  v = vocab.get_vocabulary(data_dir=prepared_data_dir)
  assert isinstance(v, seqio.SentencePieceVocabulary)
  assert (v.pad_id, v.eos_id, v.unk_id, v.vocab_size) == (0, 1, 2, 8000)
  assert v.tokenizer.bos_id() == -1
  for text in [
    "def f(x):\n    if x:\n\t\treturn  x + 1  # two spaces\n",
    "Hallo, schöne Grüße! Привет, как дела? 你好，世界。 🙂",
    "Achilles was a Greek hero of the Trojan War.",
  ]:
    ids = v.encode(text)
    assert v.unk_id not in ids  # byte fallback: every script encodes
    assert v.decode(ids) == text
  assert len(v.encode("the history of the")) <= 5  # a real subword vocabulary, not bytes


def test_get_vocabulary_kinds_and_errors(tmp_path):
  assert isinstance(vocab.get_vocabulary("byte"), seqio.ByteVocabulary)
  with pytest.raises(ValueError, match="sentencepiece"):
    vocab.get_vocabulary("wordpiece")
  with pytest.raises(FileNotFoundError, match=r"lifelong_moe_jax\.data\.prepare --data_dir"):
    vocab.get_vocabulary(data_dir=str(tmp_path))


def test_lazy_vocabulary_follows_the_data_dir_chosen_later(prepared_data_dir, tmp_path):
  lazy = vocab.LazyVocabulary()
  assert "LazyVocabulary" in str(lazy)  # printing does not resolve
  with data_dir_lib.using_data_dir(prepared_data_dir):
    assert lazy.vocab_size == 8000 and lazy.eos_id == 1
    assert lazy.decode(lazy.encode("hello world")) == "hello world"
    assert lazy == vocab.get_vocabulary()
  with data_dir_lib.using_data_dir(str(tmp_path)), pytest.raises(FileNotFoundError):
    _ = lazy.vocab_size


def test_fingerprints(prepared_data_dir):
  v = vocab.get_vocabulary(data_dir=prepared_data_dir)
  fingerprint = vocab.vocabulary_fingerprint(v)
  assert fingerprint == f"sentencepiece:sha256={hashlib.sha256(v.sp_model).hexdigest()}:extra_ids=0"
  assert vocab.vocabulary_fingerprint(seqio.ByteVocabulary()) == "byte:extra_ids=0"
  vocab.check_vocabulary_fingerprint(fingerprint, fingerprint)
  with pytest.raises(ValueError, match="byte:extra_ids=0"):
    vocab.check_vocabulary_fingerprint(fingerprint, "byte:extra_ids=0")


def test_training_is_deterministic_and_reused(prepared_data_dir, tmp_path):
  models = []
  for run in ("a", "b"):
    root = str(tmp_path / run)
    shutil.copytree(os.path.join(prepared_data_dir, "dialog_en"), os.path.join(root, "dialog_en"))
    first = vocab.train_vocabulary(["dialog_en"], root, vocab_size=600, sample_bytes=150_000)
    assert first.status == "built"
    again = vocab.train_vocabulary(["dialog_en"], root, vocab_size=600, sample_bytes=150_000)
    assert again.status == "reused"
    models.append(first.marker["model_sha256"])
    assert vocab.get_vocabulary(data_dir=root).vocab_size == 600
  assert models[0] == models[1]
  changed = vocab.train_vocabulary(
    ["dialog_en"], str(tmp_path / "a"), vocab_size=500, sample_bytes=150_000
  )
  assert changed.status == "built"  # other settings retrain
  assert vocab.get_vocabulary(data_dir=str(tmp_path / "a")).vocab_size == 500  # no stale cache
