"""lm-evaluation-harness model and CLI (issue 14), on a tiny checkpoint trained here, offline.

* a harness task YAML over a local JSONL of ``fewshot_polarity`` (our k-shot prompts): the
  harness's ``acc`` equals our few-shot engine's accuracy on the same questions and k;
* ``loglikelihood`` equals the teacher-forced score; ``loglikelihood_rolling`` equals the one-window
  sum when the text fits and scores every token once, consistently, when it does not;
* ``generate_until`` equals ``infer``'s continuation and stops at ``until``;
* missing extra, wrong vocabulary and a checkpoint of another model: one clear error each;
* the CLI wrapper writes the harness's results JSON and prints its table; the lifelong runner's
  ``HarnessEval`` callback.
"""

import dataclasses
import glob
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lifelong_moe_jax import checkpoint_manager  # noqa: E402
from lifelong_moe_jax import checkpoints  # noqa: E402
from lifelong_moe_jax import decoding  # noqa: E402
from lifelong_moe_jax import partitioning  # noqa: E402
from lifelong_moe_jax.data import data_dir as data_dir_lib  # noqa: E402
from lifelong_moe_jax.data import vocab as vocab_lib  # noqa: E402
from lifelong_moe_jax.eval import fewshot  # noqa: E402
from lifelong_moe_jax.eval import harness  # noqa: E402
from lifelong_moe_jax.eval import harness_tasks  # noqa: E402
from lifelong_moe_jax.eval import inference  # noqa: E402
from lifelong_moe_jax.models import lm  # noqa: E402
from lifelong_moe_jax.models.config import ModelConfig  # noqa: E402
from lifelong_moe_jax.training import optimizers  # noqa: E402

import tasks.fewshot  # noqa: E402,F401

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(
  embed_dim=32,
  num_layers=2,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_experts=4,
  top_k=2,
  group_size=64,
  max_length=256,
)
K = 1
QUESTIONS = 16


@pytest.fixture(scope="module")
def trained(prepared_data_dir, tmp_path_factory):
  """A checkpoint of the tiny MoE trained for a few steps, restored as the harness model."""
  from lifelong_moe_jax.training import run  # pylint: disable=import-outside-toplevel

  model_dir = str(tmp_path_factory.mktemp("harness_run"))
  with data_dir_lib.using_data_dir(prepared_data_dir):
    vocabulary = vocab_lib.get_vocabulary(data_dir=prepared_data_dir)
    model = lm.build_model(CFG, vocabulary.vocab_size)
    run.train_model(
      model=model,
      partitioner=partitioning.Partitioner(
        partitioning.create_mesh(partitioning.MeshConfig(2, 4, 1))
      ),
      optimizer=optimizers.create_optimizer(
        "adamw", optimizers.learning_rate_schedule("constant", 3e-3, warmup_steps=0)
      ),
      vocabulary=vocabulary,
      model_dir=model_dir,
      mixture_or_task_name="lifelong_dialog_en",
      task_feature_lengths={"targets": 64},
      train_steps=6,
      batch_size=8,
      data_dir=prepared_data_dir,
      summary_every_steps=100,
      log_every_steps=100,
    )
  model_lm = harness.LifelongMoeLM(checkpoint=model_dir, data_dir=prepared_data_dir, batch_size=8)
  return model_dir, model_lm


def _requests(kind, args_list):
  return [
    Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)
  ]


def _teacher_forced(model_lm, ctx, cont):
  """sum log p(cont | BOS, ctx) by ``LanguageModel.score`` (the training loss path), unsharded."""
  loaded = model_lm.loaded
  targets = np.array([list(ctx) + list(cont)], np.int32)
  batch = {
    "decoder_input_tokens": np.concatenate([[[0]], targets[:, :-1]], axis=1),
    "decoder_target_tokens": targets,
    "decoder_loss_weights": np.array([[0] * len(ctx) + [1] * len(cont)], np.float32),
  }
  params = jax.device_get(loaded.params)
  return float(jax.jit(decoding.decoding_model(loaded.model).score)(params, batch)[0])


def test_harness_acc_equals_our_fewshot_accuracy(trained, tmp_path, prepared_data_dir):
  _, model_lm = trained
  local = harness_tasks.export_fewshot_task(
    "fewshot_polarity", str(tmp_path), k=K, max_examples=QUESTIONS
  )
  assert local.num_questions == QUESTIONS and local.name == "fewshot_polarity_k1"
  first = json.loads(open(local.data_file, encoding="utf-8").readline())
  assert first["choices"] == [" negative", " positive"] and first["query"].endswith("Sentiment:")
  assert first["query"].count("Sentiment:") == K + 1  # one demonstration + the query
  results = harness_tasks.evaluate(model_lm, [local.name], include_path=str(tmp_path))
  values = harness_tasks.metric_values(results)[local.name]
  loaded = model_lm.loaded
  with loaded.partitioner.context():
    ours = fewshot.run_fewshot(
      loaded.model,
      loaded.params,
      loaded.vocabulary,
      ["fewshot_polarity"],
      K,
      max_examples=QUESTIONS,
    )["fewshot_polarity"]
  assert ours["num_examples"] == QUESTIONS
  assert values["acc"] == pytest.approx(ours["accuracy"] / 100.0, abs=1e-9)
  # Not a coincidence: every (prompt, choice) score agrees with our engine's.
  rows = [json.loads(line) for line in open(local.data_file, encoding="utf-8")]
  pairs = [(r["query"], c) for r in rows for c in r["choices"]]
  theirs = [ll for ll, _ in model_lm.loglikelihood(_requests("loglikelihood", pairs))]
  encoded = [harness.prompts.encode_pair(loaded.vocabulary, p, c) for p, c in pairs]
  assert max(len(a) + len(b) for a, b in encoded) < CFG.max_length  # no prompt was cut
  with loaded.partitioner.context():
    engine, _ = fewshot.score_pairs(loaded.model, loaded.params, encoded)
  np.testing.assert_allclose(theirs, engine, atol=2e-3)


def test_loglikelihood_equals_teacher_forced_score_and_greedy_flag(trained):
  _, model_lm = trained
  pairs = [
    ("Review: a fine film\nSentiment:", " positive"),
    ("The cat sat on", " the mat."),
    ("", "Hello there, how are you?"),
  ]
  got = model_lm.loglikelihood(_requests("loglikelihood", pairs))
  for (context, cont), (ll, _) in zip(pairs, got):
    ctx_ids, cont_ids = model_lm.encode_request(context, cont)
    assert ll == pytest.approx(_teacher_forced(model_lm, ctx_ids, cont_ids), abs=2e-3)
  # Greedy flag: the argmax continuation is greedy, another token is not.
  ctx_ids = list(model_lm.vocabulary.encode("The cat sat on"))
  gen = decoding.generate(
    model_lm.loaded.model,
    jax.device_get(model_lm.loaded.params),
    np.array([ctx_ids], np.int32),
    max_decode_len=3,
    stop_ids=(),
  )
  greedy_ids = [int(t) for t in np.asarray(gen.tokens)[0]]
  other = [greedy_ids[0] + 1 if greedy_ids[0] + 1 < model_lm.vocabulary.vocab_size else 2]
  (_, is_greedy), (_, not_greedy) = model_lm.score_pairs([(ctx_ids, greedy_ids), (ctx_ids, other)])
  assert is_greedy and not not_greedy
  # A context longer than the window is cut from the left, as the harness expects.
  short = harness.LifelongMoeLM(loaded=model_lm.loaded, max_length=16)
  long_ctx, cont = list(range(5, 40)), [7, 8]
  ((ll, _),) = short.score_pairs([(long_ctx, cont)])
  assert ll == pytest.approx(_teacher_forced(model_lm, long_ctx[-14:], cont), abs=2e-3)


def test_loglikelihood_rolling_one_window_and_across_window_sizes(trained):
  _, model_lm = trained
  text = (
    "Lifelong learning adds experts to a mixture of experts model as new data "
    "distributions arrive, and distillation keeps the old ones from being forgotten."
  )
  ids = list(model_lm.vocabulary.encode(text))
  assert 16 < len(ids) < CFG.max_length
  (total,) = model_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
  assert total == pytest.approx(_teacher_forced(model_lm, [], ids), abs=2e-3)
  # Does not fit: windows of 8 and 12 tokens score every token exactly once.
  full = model_lm.rolling_token_scores([text])[0]
  for window in (8, 12):
    small = harness.LifelongMoeLM(loaded=model_lm.loaded, max_length=window)
    spans = harness.rolling_windows(len(ids), window)
    assert [p for _, p, _ in spans] == [0] + [e for _, _, e in spans[:-1]] and spans[-1][2] == len(
      ids
    )
    per_token = small.rolling_token_scores([text])[0]
    assert per_token.shape == (len(ids),)
    # The first window sees the same context as the one-window run.
    np.testing.assert_allclose(per_token[:window], full[:window], atol=2e-3)
    # The total is the sum of the windows' loglikelihoods (each window scored from its context).
    expected = sum(
      ll for ll, _ in model_lm.score_pairs([(ids[s:p], ids[p:e]) for s, p, e in spans])
    )
    (rolled,) = small.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert rolled == pytest.approx(expected, abs=5e-3)
    assert rolled == pytest.approx(float(per_token.sum()), abs=1e-6)


def test_generate_until_equals_infer_and_stops_at_until(trained):
  _, model_lm = trained
  texts = ["Hello, how are", "def fibonacci(n):", "The weather today"]
  expected = [inference.continue_prompt(model_lm.loaded, t, max_decode_len=12) for t in texts]
  args = [(t, {"until": ["\x00never"], "max_gen_toks": 12}) for t in texts]
  assert model_lm.generate_until(_requests("generate_until", args)) == expected
  stop_args, cut = [], []
  for t, e in zip(texts, expected):
    assert e, "the tiny model generated nothing"
    stop = e[len(e) // 2]
    stop_args.append((t, {"until": [stop], "max_gen_toks": 12, "do_sample": False}))
    cut.append(e[: e.index(stop)])
  assert model_lm.generate_until(_requests("generate_until", stop_args)) == cut


def test_missing_extra_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "lm_eval", None)
  with pytest.raises(harness.HarnessNotInstalledError, match=r"'harness'.*\.\[harness\]"):
    harness.require_harness()
  with pytest.raises(harness.HarnessNotInstalledError):
    harness.LifelongMoeLM(checkpoint="/nonexistent")


def test_cli_missing_extra_prints_one_error_line(prepared_data_dir):
  code = (
    "import sys, runpy; sys.modules['lm_eval'] = None; "
    "sys.argv = ['harness', '--checkpoint', '/nonexistent', '--tasks', 'x']; "
    "runpy.run_module('lifelong_moe_jax.harness', run_name='__main__')"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, "LIFELONG_MOE_DATA_DIR": prepared_data_dir},
  )
  assert proc.returncode == 2, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: lm-evaluation-harness (lm_eval) is not installed")
  assert "[harness]" in lines[-1] and sum(line.startswith("error:") for line in lines) == 1


def _save(model_dir, config, vocabulary, metadata, store_config=True):
  model = lm.build_model(config, vocabulary.vocab_size)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0)))
  stored = {"model_config": dataclasses.asdict(model.config)} if store_config else {}
  checkpoint_manager.save_state(
    model_dir, 1, {"params": params, "step": np.int32(1)}, {**stored, **metadata}
  )


def test_wrong_vocabulary_is_one_clear_error(tmp_path, prepared_data_dir):
  vocabulary = vocab_lib.get_vocabulary(data_dir=prepared_data_dir)
  _save(str(tmp_path), CFG, vocabulary, {"vocabulary_fingerprint": "0" * 16})
  with pytest.raises(ValueError, match="(?i)vocabular"):
    harness.LifelongMoeLM(checkpoint=str(tmp_path), data_dir=prepared_data_dir)


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path, prepared_data_dir):
  """A checkpoint that stores no model config, of a wider model than the user's gin file says."""
  vocabulary = vocab_lib.get_vocabulary(data_dir=prepared_data_dir)
  model_dir = str(tmp_path / "other")
  _save(
    model_dir,
    dataclasses.replace(CFG, embed_dim=48),
    vocabulary,
    {"vocabulary_fingerprint": vocab_lib.vocabulary_fingerprint(vocabulary)},
    store_config=False,
  )
  try:
    with pytest.raises(checkpoints.CheckpointMismatchError, match="does not match the model"):
      harness.LifelongMoeLM(
        checkpoint=model_dir,
        data_dir=prepared_data_dir,
        gin_file=os.path.join(REPO, "gin/models/tiny.gin"),
      )
  finally:
    gin.clear_config()


def test_cli_writes_results_json_and_prints_table(trained, tmp_path, prepared_data_dir):
  model_dir, _ = trained
  local = harness_tasks.export_fewshot_task(
    "fewshot_polarity", str(tmp_path / "tasks"), k=K, max_examples=8
  )
  out = tmp_path / "out"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "lifelong_moe_jax.harness",
      "--checkpoint",
      model_dir,
      "--data_dir",
      prepared_data_dir,
      "--tasks",
      local.name,
      "--include_path",
      str(tmp_path / "tasks"),
      "--output_path",
      str(out),
      "--batch_size",
      "8",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  header = next(line for line in proc.stdout.splitlines() if "Tasks" in line)  # pytablewriter 1.x
  assert "Metric" in header and local.name in proc.stdout and "acc" in proc.stdout
  found = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
  assert found, os.listdir(out)
  saved = json.load(open(found[0], encoding="utf-8"))
  assert 0.0 <= saved["results"][local.name]["acc,none"] <= 1.0


def test_runner_harness_callback(trained, tmp_path):
  from lifelong_moe_jax.lifelong import phase_callbacks  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong.schedule import ScheduleError  # pylint: disable=import-outside-toplevel

  _, model_lm = trained
  local = harness_tasks.export_fewshot_task("fewshot_polarity", str(tmp_path), k=K, max_examples=8)
  with pytest.raises(ScheduleError, match="no_such_task"):
    phase_callbacks.HarnessEval(
      enabled=True, tasks=("no_such_task",), include_path=str(tmp_path)
    ).callback()
  callbacks = {}
  phase_callbacks.HarnessEval(enabled=False).add_to(callbacks)
  assert not callbacks
  phase_callbacks.HarnessEval(
    enabled=True, tasks=(local.name,), include_path=str(tmp_path), batch_size=8
  ).add_to(callbacks)
  loaded = model_lm.loaded
  ctx = phase_callbacks.PhaseContext(
    method="lifelong_moe",
    index=0,
    phase=None,
    model=loaded.model,
    params=loaded.params,
    partitioner=loaded.partitioner,
    vocabulary=loaded.vocabulary,
    phase_dir=str(tmp_path),
  )
  result = callbacks["harness"](ctx)
  assert set(result) == {local.name} and 0.0 <= result[local.name]["acc"] <= 1.0
