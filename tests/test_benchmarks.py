"""The README's benchmark commands run end to end (tiny settings; the numbers are not checked here,
benchmarks print ratios measured in one run, see benchmarks/)."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, data_dir, *args):
  env = dict(
    os.environ,
    LIFELONG_MOE_DATA_DIR=data_dir,
    NO_GCE_CHECK="true",
    TF_CPP_MIN_LOG_LEVEL="2",
    CUDA_VISIBLE_DEVICES="",
  )
  env.pop("XLA_FLAGS", None)  # train_step.py asks for 8 host devices itself
  proc = subprocess.run(
    [sys.executable, os.path.join("benchmarks", script), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stdout


def test_moe_vs_dense_prints_a_ratio(prepared_data_dir):
  out = _run(
    "moe_vs_dense.py",
    prepared_data_dir,
    "--moe_gin=models/tiny.gin",
    "--dense_gin=models/tiny_dense.gin",
    "--vocab_size=256",
    "--batch=8",
    "--length=64",
    "--steps=2",
    "--rounds=1",
  )
  ratio = re.search(r"ratio moe/dense = ([0-9.]+)", out)
  assert ratio and float(ratio.group(1)) > 0, out


def test_train_step_prints_mesh_ratios(prepared_data_dir):
  out = _run(
    "train_step.py",
    prepared_data_dir,
    "--gin_file=models/tiny.gin",
    "--batch=8",
    "--length=64",
    "--steps=2",
    "--rounds=1",
  )
  assert re.search(r"ratio 8 / 1 device: tokens/s x[0-9.]+", out), out
  assert re.search(r"outside-jit fraction \(worst mesh\): [0-9.]+%", out), out


def test_checkpoint_verify_prints_throughput_and_glam_estimate(tmp_path):
  out = _run(
    "checkpoint_verify.py",
    str(tmp_path),
    "--size_mb=4",
    "--leaves=4",
    "--rounds=1",
    f"--dir={tmp_path}",
  )
  assert re.search(r"checksum throughput: [0-9]+ MB/s warm, ([0-9]+|nan) MB/s cold", out), out
  # The GLaM 0.1B/64E train state, from abstract shapes: float32 params + factored Adafactor state.
  assert re.search(
    r"models/glam_0.1b_64e.gin: params 2,262,092,544 \(float32, 9.05 GB\) \+ "
    r"adafactor state 32,134,436 values \(0.13 GB\) = train state 9.18 GB",
    out,
  ), out
  assert re.search(r"estimated full verification .*: [0-9.]+ s warm", out), out
  assert os.listdir(tmp_path) == []  # the measured checkpoint is removed


def _run_no_data(script, *args):
  env = dict(os.environ, NO_GCE_CHECK="true", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, os.path.join("benchmarks", script), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stdout


def test_moe_layer_benchmark_prints_ratios_and_memory():
  out = _run_no_data(
    "moe_layer.py",
    "--configs=e8,e64",
    "--embed=16",
    "--mlp=32",
    "--group_size=32",
    "--tokens=64",
    "--steps=1",
    "--rounds=1",
  )
  for dispatch in ("einsum", "sort", "ragged"):
    assert re.search(rf"{dispatch} +fwd\+bwd +[0-9,]+ tokens/s +x *[0-9.]+ +temp memory", out), out
  assert "skipping 'ragged' on CPU" in out  # E=64 on CPU


def test_moe_vs_dense_with_more_experts_and_dispatches():
  out = _run_no_data(
    "moe_vs_dense.py",
    "--moe_gin=models/tiny.gin",
    "--dense_gin=models/tiny_dense.gin",
    "--vocab_size=256",
    "--batch=8",
    "--length=64",
    "--steps=1",
    "--rounds=1",
    "--num_experts=16",
    "--dispatches=einsum,sort",
  )
  assert "MoE: 16 experts" in out, out
  assert re.search(r"ratio moe_sort/dense = [0-9.]+", out), out
  assert re.search(r"ratio moe/dense = [0-9.]+ \(best dispatch: \w+", out), out


def test_mfu_reports_achieved_flops_on_cpu():
  shrink = [
    "vocab_size = 256",
    "num_layers = 2",
    "embed_dim = 32",
    "num_heads = 2",
    "head_dim = 16",
    "mlp_dim = 64",
    "num_experts = 8",
    "group_size = 64",
  ]
  out = _run_no_data(
    "mfu.py",
    "--batch=2",
    "--length=64",
    "--steps=1",
    "--rounds=1",
    "--dispatches=einsum,sort",
    *[f"--gin_param=ModelConfig.{b}" for b in shrink],
  )
  for dispatch in ("einsum", "sort"):
    assert re.search(rf"{dispatch} +step +[0-9.]+ ms .* GFLOP/s +MFU n/a", out), out


def _tiny_moe_checkpoint(prepared_data_dir, tmp_path, steps=2, name="tiny") -> str:
  """A tiny MoE (2 experts) trained ``steps`` steps here (the same batches in the same order for
  every ``steps``) and saved as a run ``tmp_path/name``; returns the run dir."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import checkpoint_manager  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.models import lm  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import optimizers  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import trainer as trainer_lib  # pylint: disable=import-outside-toplevel

  vocab = vocab_lib.get_vocabulary(data_dir=prepared_data_dir)
  config = ModelConfig(
    vocab_size=vocab.vocab_size,
    embed_dim=16,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_experts=2,
    group_size=32,
    max_length=32,
  )
  trainer = trainer_lib.Trainer(
    lm.LanguageModel(config),
    partitioning.Partitioner(partitioning.create_mesh(partitioning.MeshConfig())),
    optimizers.create_optimizer(name="adafactor"),
  )
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  for _ in range(steps):
    tokens = rng.integers(1, vocab.vocab_size, (8, 32)).astype(np.int32)
    state, _ = trainer.train_step(
      state, trainer.global_batch({"decoder_input_tokens": tokens, "decoder_target_tokens": tokens})
    )
  model_dir = str(tmp_path / name)
  checkpoint_manager.save_state(
    model_dir,
    steps,
    state,
    {
      "model_config": dataclasses.asdict(config),
      "optimizer": "adafactor",
      "vocabulary_fingerprint": vocab_lib.vocabulary_fingerprint(vocab),
    },
  )
  return model_dir


def test_router_init_step0_prints_the_step0_table(prepared_data_dir, tmp_path):
  """A tiny MoE trained 2 steps here, expanded with every router_init and evaluated before/after."""
  model_dir = _tiny_moe_checkpoint(prepared_data_dir, tmp_path)
  out = _run(
    "router_init_step0.py",
    prepared_data_dir,
    f"--checkpoint={model_dir}",
    f"--data_dir={prepared_data_dir}",
    "--mixture=lifelong_dialog_en",
    "--eval_tasks=lifelong_wiki_en,lifelong_dialog_en",
    "--add_experts=2",
    "--length=32",
    "--eval_batch=2",
    "--eval_batches=1",
    "--mean_batches=1",
    "--router_offsets=1,4",
    "--router_old_offsets=8",
  )
  assert "2 -> 4 experts per MoE layer" in out, out
  labels = ("copy", r"copy_offset \(1\)", r"copy_offset \(4\)", r"copy_contrast \(4/8\)", "zero")
  for label in labels + ("small_random",):
    assert re.search(
      rf"\| {label} \| [+-][0-9.]+% \| [0-9.]+% \| [+-][0-9.]+% \| [0-9.]+% \|", out
    ), out


def test_router_separability_prints_probe_rows(prepared_data_dir, tmp_path):
  """Probes on the tiny MoE's router inputs: one row per MoE layer and pair, values in range."""
  import json  # pylint: disable=import-outside-toplevel

  model_dir = _tiny_moe_checkpoint(prepared_data_dir, tmp_path)
  out_json = str(tmp_path / "sep.json")
  out = _run(
    "router_separability.py",
    prepared_data_dir,
    f"--checkpoint={model_dir}",
    f"--data_dir={prepared_data_dir}",
    "--tasks=lifelong_wiki_en,lifelong_code_py",
    "--batches=2",
    "--eval_batch=2",
    "--length=32",
    "--probe_steps=50",
    f"--json={out_json}",
  )
  assert re.search(r"\| 0 \| lifelong_wiki_en \| lifelong_code_py \| [0-9.]+% \|", out), out
  with open(out_json) as f:
    rows = json.load(f)["rows"]
  assert [r["layer"] for r in rows] == [0]  # 2 layers, MoE every 2nd: one MoE layer
  row = rows[0]
  assert 0.0 <= row["b_share_at_a_5pct"] <= row["b_share_at_a_10pct"] <= 1.0
  assert 0.5 < row["balanced_accuracy"] <= 1.0  # trained on these tokens' inputs: above chance
  assert 0.0 <= row["b_energy_outside_a_99"] <= row["b_energy_outside_a_90"] <= 1.0
  assert 1 <= row["a_rank_90"] <= row["a_rank_99"] <= 16


def test_forgetting_attribution_restores_groups_back_to_the_reference(prepared_data_dir, tmp_path):
  """The tiny MoE after 2 steps is the reference, after 6 the checkpoint: restoring every group
  gives the reference's own perplexities (evaluated with its own params), the trained row differs."""
  import json  # pylint: disable=import-outside-toplevel

  reference = _tiny_moe_checkpoint(prepared_data_dir, tmp_path, steps=2, name="early")
  later = _tiny_moe_checkpoint(prepared_data_dir, tmp_path, steps=6, name="late")
  out_json, out_png = str(tmp_path / "attr.json"), str(tmp_path / "attr.png")
  out = _run(
    "forgetting_attribution.py",
    prepared_data_dir,
    f"--checkpoint={later}",
    f"--reference={reference}",
    f"--data_dir={prepared_data_dir}",
    "--tasks=lifelong_wiki_en,lifelong_code_py",
    "--eval_batch=2",
    "--eval_batches=2",
    "--length=32",
    f"--json={out_json}",
    f"--png={out_png}",
  )
  assert re.search(r"\| restore attention \| [0-9,.]+ \([+-][0-9.]+%\) \|", out), out
  with open(out_json) as f:
    rows = {r["label"]: r["results"] for r in json.load(f)["rows"]}
  assert list(rows)[:2] == ["reference", "trained"]
  for task in ("lifelong_wiki_en", "lifelong_code_py"):
    ref = rows["reference"][task]["loss"]
    assert abs(rows["restore all shared + old experts"][task]["loss"] - ref) < 1e-5
    assert abs(rows["trained"][task]["loss"] - ref) > 1e-4
  with open(out_png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_distillation_bound_matches_the_evaluator_and_mixes_the_two_models(
  prepared_data_dir, tmp_path
):
  """The fit model's perplexity equals loss_eval's on the same batches; w=0 gives it back; the
  mixture's perplexity stays within the (1 + w) bound."""
  import json  # pylint: disable=import-outside-toplevel

  from lifelong_moe_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.eval import loss_eval  # pylint: disable=import-outside-toplevel

  teacher = _tiny_moe_checkpoint(prepared_data_dir, tmp_path, steps=2, name="teacher")
  fit = _tiny_moe_checkpoint(prepared_data_dir, tmp_path, steps=6, name="fit")
  out_json = str(tmp_path / "bound.json")
  out = _run(
    "distillation_bound.py",
    prepared_data_dir,
    f"--fit={fit}",
    f"--teacher={teacher}",
    f"--data_dir={prepared_data_dir}",
    "--tasks=lifelong_dialog_en",
    "--weights=0,1,0.3",
    "--eval_batch=8",
    "--eval_batches=1",
    "--length=32",
    f"--json={out_json}",
  )
  assert re.search(r"\| lifelong_dialog_en \| [0-9,.]+ \| [0-9,.]+ \| [0-9,.]+ \|", out), out
  with open(out_json) as f:
    row = json.load(f)["rows"][0]
  loaded = checkpoints.load_checkpoint(
    fit, mesh_config=partitioning.MeshConfig(), data_dir=prepared_data_dir
  )
  evaluator = loss_eval.Evaluator(
    loaded.model,
    loaded.partitioner,
    ["lifelong_dialog_en"],
    {"targets": 32},
    8,
    max_batches=1,
    data_dir=prepared_data_dir,
  )
  reference = evaluator.evaluate(loaded.params)["lifelong_dialog_en"]["perplexity"]
  assert row["fit"] == pytest.approx(reference, rel=1e-4)
  assert row["bounds"]["0.0"] == pytest.approx(row["fit"], rel=1e-9)
  for w in (1.0, 0.3):
    assert row["bounds"][str(w)] <= (1 + w) * row["fit"]
  assert row["bounds"]["1.0"] != pytest.approx(row["fit"], rel=1e-6)  # the teacher mixed in


def test_distill_step_prints_the_ratio_and_a_live_kl(prepared_data_dir):
  out = _run(
    "distill_step.py",
    prepared_data_dir,
    "--gin_file=models/tiny.gin",
    "--vocab_size=256",
    "--batch=4",
    "--length=32",
    "--steps=1",
    "--rounds=1",
    "--teacher_train_capacity",
    "--teacher_samples",
    "--teacher_sample_batch=2",
  )
  assert re.search(r"lifelong_moe \(teacher cf [0-9.]+\) .* last KL", out), out
  samples = re.search(r"lifelong_moe \(teacher samples\) .* last KL ([0-9.]+)\)", out)
  assert samples and float(samples.group(1)) > 0, out
  assert re.search(r"\(distill_inputs='teacher_samples'\): x[0-9.]+", out), out
  assert re.search(r"lifelong_moe / expand_freeze \(best teacher\): x[0-9.]+", out), out
  assert re.search(r"\(default teacher, eval capacity\): x[0-9.]+", out), out
  assert re.search(r"\(teacher_capacity='train'\): x[0-9.]+", out), out
  kl = re.search(r"lifelong_moe \(teacher einsum\) .* last KL ([0-9.]+)\)", out)
  assert kl and float(kl.group(1)) > 0, out  # teacher (random init) and student differ


def test_sample_languages_counts_the_characters_of_each_phases_rows(prepared_data_dir, tmp_path):
  """Rows of hand-written English and German (ASCII stop words) sequences, saved as two phases'
  teacher samples: the printed and JSON shares equal the decoded characters counted by hand."""
  import json  # pylint: disable=import-outside-toplevel

  from lifelong_moe_jax.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong import pseudo_rehearsal  # pylint: disable=import-outside-toplevel

  vocab = vocab_lib.get_vocabulary(data_dir=prepared_data_dir)
  english = "the cat is on the mat and it was there for a while"
  german = "und der hund ist nicht mit dem ich auf die wir es sie"
  length = 64

  def rows(texts, num_rows):  # the texts' sequences (EOS included) packed in order
    sequences = [list(vocab.encode(text)) + [1] for text in texts]
    return pseudo_rehearsal.pack_sequences(sequences, num_rows, length)[0]

  run = tmp_path / "run"
  for phase, texts, num_rows in (
    ("phase_1_b", [english, english], 2),
    ("phase_2_c", [english, german], 1),
  ):
    os.makedirs(run / phase)
    pseudo_rehearsal.save_samples(str(run / phase), rows(texts, num_rows))
  out_json = str(tmp_path / "languages.json")
  out = _run(
    "sample_languages.py",
    prepared_data_dir,
    f"--run={run}",
    f"--data_dir={prepared_data_dir}",
    "--calibrate=wiki_en",
    f"--json={out_json}",
  )
  en_chars, de_chars = (
    len(vocab.decode(vocab.encode(english))),
    len(vocab.decode(vocab.encode(german))),
  )
  expected_en = en_chars / (en_chars + de_chars)
  assert "| phase_1_b (2 rows) | 2 | 100.0% | 0.0% |" in out, out
  assert (
    f"| phase_2_c (1 rows) | 2 | {100 * expected_en:.1f}% | {100 * (1 - expected_en):.1f}% |" in out
  )
  with open(out_json) as f:
    report = json.load(f)
  assert [p["phase"] for p in report["phases"]] == ["phase_1_b", "phase_2_c"]
  assert abs(report["phases"][1]["shares"]["en"] - expected_en) < 1e-9
  assert abs(sum(report["phases"][1]["shares"].values()) - 1.0) < 1e-9
  assert report["calibration"][0]["shares"]["en"] > 0.95  # English encyclopedia text
