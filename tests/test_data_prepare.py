"""prepare: default distributions, sizes, idempotency, interrupted builds, missing packages."""

import os
import shutil
import sys

import pytest

from lifelong_moe_jax.data import distributions
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import prepare
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.data import sources
from lifelong_moe_jax.data import vocab

MB = 1_000_000


def _mtimes(root):
  return {
    os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, files in os.walk(root)
    for f in files
    if not f.startswith(".")
  }


def test_default_distributions_and_vocabulary_built(prepared_data_dir):
  for name in distributions.DEFAULT_DISTRIBUTIONS:
    marker = shards.verify_distribution(os.path.join(prepared_data_dir, name))
    sizes = shards.summarize(marker)
    assert sizes["train"].text_bytes >= 1 * MB, (name, sizes)
    assert sizes["validation"].text_bytes >= 50_000, (name, sizes)
    assert sizes["train"].num_documents > 500
    tfds_dir = os.path.join(prepared_data_dir, "tfds", "lifelong_text", name, "1.0.0")
    assert os.path.exists(os.path.join(tfds_dir, "dataset_info.json"))
  spm = vocab.get_vocabulary(data_dir=prepared_data_dir)
  assert spm.vocab_size == vocab.DEFAULT_VOCAB_SIZE
  assert pipeline.ensure_prepared(prepared_data_dir) == os.path.abspath(prepared_data_dir)


def test_second_run_reuses_everything(prepared_data_dir, capsys):
  before = {k: v for k, v in _mtimes(prepared_data_dir).items() if "/." not in k}
  assert prepare.main(["--data_dir", prepared_data_dir]) == 0
  out = capsys.readouterr().out
  for name in distributions.DEFAULT_DISTRIBUTIONS:
    assert f"{name:<15}reused" in out
  assert "vocabulary     reused" in out
  assert "fortunes_intl" in out  # the optional distribution is mentioned (available or apt command)
  after = {k: v for k, v in _mtimes(prepared_data_dir).items() if k in before}
  assert after == before  # nothing was rewritten


def _copy_code_py(prepared_data_dir, tmp_path):
  root = str(tmp_path / "data")
  shutil.copytree(os.path.join(prepared_data_dir, "code_py"), os.path.join(root, "code_py"))
  return root


def test_interrupted_build_is_detected_and_redone(prepared_data_dir, tmp_path):
  root = _copy_code_py(prepared_data_dir, tmp_path)
  dist = os.path.join(root, "code_py")
  with open(os.path.join(prepared_data_dir, "code_py", shards.MARKER), "rb") as f:
    reference_marker = f.read()

  def run():
    return prepare.prepare(root, ["code_py"], build_vocab=False, materialize_tfds=False)

  assert run().distributions == {"code_py": "reused"}

  # A shard cut short (e.g. disk full, or killed while copying) is detected by its size.
  shard = sorted(f for f in os.listdir(dist) if f.startswith("train-"))[1]
  with open(os.path.join(dist, shard), "r+b") as f:
    f.truncate(1000)
  with pytest.raises(shards.IncompleteBuildError, match=shard):
    shards.verify_distribution(dist)
  assert run().distributions == {"code_py": "built"}
  shards.verify_distribution(dist)

  # A process killed mid-build: scratch folder left behind, final folder without its marker.
  os.makedirs(os.path.join(root, ".code_py.partial"))
  with open(os.path.join(root, ".code_py.partial", "train-00000-of-00004.jsonl"), "w") as f:
    f.write('{"text": "half')
  os.remove(os.path.join(dist, shards.MARKER))
  assert run().distributions == {"code_py": "built"}
  assert not os.path.exists(os.path.join(root, ".code_py.partial"))

  # Deterministic: the rebuild is byte-identical to the session's build.
  with open(os.path.join(dist, shards.MARKER), "rb") as f:
    assert f.read() == reference_marker


def test_missing_pip_package_names_install_command(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "chitchat_dataset", None)  # makes `import chitchat_dataset` fail
  with pytest.raises(sources.MissingPackageError, match=r'pip install -e "\.\[corpora\]"'):
    prepare.prepare(str(tmp_path), ["dialog_en"], build_vocab=False, materialize_tfds=False)
  assert (
    prepare.main(["--data_dir", str(tmp_path), "--distributions", "dialog_en", "--skip_vocab"]) == 1
  )


def test_optional_distribution_without_debian_packages_is_skipped(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(sources, "FORTUNES_ROOT", str(tmp_path / "no_fortunes"))
  report = prepare.prepare(
    str(tmp_path / "data"), ["fortunes_intl"], build_vocab=False, materialize_tfds=False
  )
  assert report.distributions == {}
  assert "apt-get install -y fortunes-de fortunes-ru fortunes-zh" in report.skipped["fortunes_intl"]
  assert "apt-get install" in capsys.readouterr().out
  assert "apt-get install" in prepare.optional_hint()


def test_unknown_distribution_and_unprepared_dir(tmp_path):
  with pytest.raises(ValueError, match="wiki_en"):
    prepare.prepare(str(tmp_path), ["wikipedia"], build_vocab=False)
  with pytest.raises(
    pipeline.DataNotPreparedError, match=r"python -m lifelong_moe_jax\.data\.prepare --data_dir"
  ):
    pipeline.ensure_prepared(str(tmp_path))


def test_split_units_keeps_units_whole_and_is_deterministic():
  units = [(f"u{i}", [f"doc {i} a", f"doc {i} b"]) for i in range(50)] + [("dup", ["doc 3 a"])]
  a = distributions.split_units(units, 0.2, None)
  assert distributions.split_units(units, 0.2, None) == a
  assert not set(a["train"]) & set(a["validation"])
  for i in range(50):  # both documents of a unit land in the same split
    assert (f"doc {i} a" in a["validation"]) == (f"doc {i} b" in a["validation"])
  assert len(a["train"]) + len(a["validation"]) == 100  # the duplicate document was dropped


def _fortunes_installed():
  try:
    return bool(sources.fortune_files())
  except sources.MissingDebianPackagesError:
    return False


@pytest.mark.skipif(
  not _fortunes_installed(),
  reason="apt-get install -y fortunes-de fortunes-ru fortunes-zh to run this",
)
def test_optional_non_english_distribution_builds_when_installed(tmp_path):
  report = prepare.prepare(
    str(tmp_path), ["fortunes_intl"], build_vocab=False, materialize_tfds=False
  )
  sizes = report.sizes["fortunes_intl"]
  assert sizes["train"].text_bytes >= 1 * MB and sizes["validation"].text_bytes >= 50_000
  docs = [
    t
    for _, _, t in shards.iter_documents(
      shards.split_files(str(tmp_path / "fortunes_intl"), "validation")
    )
  ]
  text = "".join(docs)
  assert any("\u0400" <= c <= "\u04ff" for c in text)  # Cyrillic
  assert any("\u4e00" <= c <= "\u9fff" for c in text)  # CJK
  assert "\x1b[" not in text  # ANSI colour codes stripped
