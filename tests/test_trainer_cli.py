"""End-to-end runs of ``python -m lifelong_moe_jax.train`` on 8 fake CPU devices (mesh data=2,
expert=4), tiny model, the real ``lifelong_all`` mixture.

Runs (module fixtures, shared by the tests):

* S: 40 steps straight (checkpoints every 10, summaries every step, eval at step 40);
* B: a run to 1000 steps that only checkpoints at step 20, killed with SIGKILL once that checkpoint
  is complete; restarted with TRAIN_STEPS=30 (resumes at 20, checkpoints at 30), then with
  TRAIN_STEPS=50 (resumes at 30). Its steps 21-40 and its step-40 state must equal S's exactly.

Subprocesses share a persistent XLA compilation cache so only the first run compiles.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_env import cli_env
import tensorflow as tf

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import param_tree
from lifelong_moe_jax import partitioning as pt
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import summaries
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_ARGS = [
  "--gin_file=models/tiny.gin",
  "--gin_file=runs/pretrain.gin",
  '--gin.MIXTURE_OR_TASK_NAME="lifelong_all"',
  "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
  "--gin.BATCH_SIZE=8",
  "--gin.MeshConfig.data=2",
  "--gin.MeshConfig.expert=4",
  "--gin.train.summary_every_steps=1",
  "--gin.train.log_every_steps=10",
  "--gin.train.eval_every_steps=0",
  "--gin.learning_rate_schedule.warmup_steps=10",
  "--gin.CheckpointConfig.save_interval_steps=10",
]
TRAIN_SCALARS = (
  "loss",
  "cross_entropy",
  "aux_loss",
  "z_loss",
  "learning_rate",
  "grad_norm",
  "tokens_per_second",
  "step_time",
  "moe/layer_1/expert_3_fraction",
  "moe/layer_1/dropped_fraction",
)


def _env(data_dir):
  return cli_env(data_dir)


def _command(model_dir, train_steps, *extra):
  return [
    sys.executable,
    "-m",
    "lifelong_moe_jax.train",
    *BASE_ARGS,
    f'--gin.MODEL_DIR="{model_dir}"',
    f"--gin.TRAIN_STEPS={train_steps}",
    *extra,
  ]


def _run(data_dir, model_dir, train_steps, *extra) -> str:
  proc = subprocess.run(
    _command(model_dir, train_steps, *extra),
    cwd=REPO,
    env=_env(data_dir),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stderr


def _losses(model_dir):
  records = summaries.read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in records}, [r["step"] for r in records]


@pytest.fixture(scope="module")
def straight(prepared_data_dir, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("straight") / "run")
  log = _run(
    prepared_data_dir,
    model_dir,
    40,
    "--gin.train.eval_every_steps=40",
    "--gin.train.eval_max_batches=1",
  )
  return model_dir, log


@pytest.fixture(scope="module")
def resumed(prepared_data_dir, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("resumed") / "run")
  marker = os.path.join(model_dir, "checkpoints", "20", "_CHECKPOINT_METADATA")
  log_path = os.path.join(os.path.dirname(model_dir), "killed.log")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      _command(
        model_dir,
        1000,
        "--gin.CheckpointConfig.save_interval_steps=1000",
        "--gin.CheckpointConfig.extra_save_steps=[20]",
      ),
      cwd=REPO,
      env=_env(prepared_data_dir),
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 600
    while not os.path.exists(marker):
      assert proc.poll() is None, open(log_path).read()[-5000:]
      assert time.time() < deadline, "step-20 checkpoint never appeared"
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(_losses(model_dir)[1])
  log_30 = _run(prepared_data_dir, model_dir, 30)
  log_50 = _run(prepared_data_dir, model_dir, 50)
  return model_dir, killed_at, log_30, log_50


def _restore_state(model_dir, step):
  step_dir = checkpoints.resolve_step_dir(model_dir, step=step)
  config = ModelConfig(**checkpoints.read_metadata(step_dir)["model_config"])
  trainer = trainer_lib.Trainer(
    lm.LanguageModel(config),
    pt.Partitioner(pt.create_mesh(pt.MeshConfig(2, 4, 1))),
    optimizers.create_optimizer("adafactor", optimizers.learning_rate_schedule()),
  )
  return jax.device_get(checkpoints.restore_tree(step_dir, trainer.abstract_state))


def test_cli_checkpoints_and_resumes_at_30(resumed):
  model_dir, killed_at, log_30, log_50 = resumed
  assert killed_at >= 20
  assert "Start state: resumed at step 20" in log_30
  assert "Start state: resumed at step 30" in log_50
  assert "step 50/50" in log_50
  assert checkpoints.read_metadata(checkpoints.resolve_step_dir(model_dir, 30))["step"] == 30
  assert checkpoint_manager.Checkpointer(model_dir).latest_step() == 50
  # Records of the killed run beyond its last checkpoint were dropped: each step once, in order.
  assert _losses(model_dir)[1] == list(range(1, 51))


def test_exact_resume_after_sigkill(straight, resumed):
  straight_dir, _ = straight
  resumed_dir = resumed[0]
  a, _ = _losses(straight_dir)
  b, _ = _losses(resumed_dir)
  assert [a[s] for s in range(21, 41)] == [b[s] for s in range(21, 41)]
  assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]
  state_a, state_b = _restore_state(straight_dir, 40), _restore_state(resumed_dir, 40)
  flat_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  flat_b = jax.tree_util.tree_leaves(state_b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=param_tree.path_str(path))
  assert checkpoints.read_metadata(straight_dir)["data"]["batches_consumed"] == 40


def _event_tags(folder):
  tags = set()
  for name in os.listdir(folder):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
        tags.update(v.tag for v in event.summary.value)
  return tags


def test_tensorboard_events_hold_train_and_eval_scalars(straight):
  model_dir, log = straight
  train_tags = _event_tags(os.path.join(model_dir, "train"))
  for tag in TRAIN_SCALARS:
    assert tag in train_tags, (tag, sorted(train_tags))
  eval_tags = _event_tags(os.path.join(model_dir, "eval"))
  for task in ("lifelong_wiki_en", "lifelong_code_py", "lifelong_dialog_en"):
    assert {f"{task}/loss", f"{task}/perplexity"} <= eval_tags, sorted(eval_tags)
  assert "step 40/40 | loss" in log and "tokens/s" in log and "ETA" in log


def test_eval_jsonl_standalone_eval_and_config(straight):
  from lifelong_moe_jax.eval import loss_eval  # pylint: disable=import-outside-toplevel

  model_dir, _ = straight
  in_training = summaries.read_jsonl(os.path.join(model_dir, "eval", "metrics.jsonl"))
  assert [r["step"] for r in in_training] == [40]
  record = in_training[0]
  assert record["lifelong_wiki_en/perplexity"] == pytest.approx(
    np.exp(record["lifelong_wiki_en/loss"])
  )
  config = ModelConfig(**checkpoints.read_metadata(model_dir)["model_config"])
  results = loss_eval.evaluate_checkpoint(
    model_dir=model_dir,
    mixture_or_task_name="lifelong_all",
    task_feature_lengths={"targets": 64},
    batch_size=8,
    max_batches=1,
    model_config=config,
    mesh_config=pt.MeshConfig(2, 4, 1),
  )
  assert results["lifelong_code_py"]["loss"] == pytest.approx(
    record["lifelong_code_py/loss"], rel=1e-5
  )
  assert len(summaries.read_jsonl(os.path.join(model_dir, "eval", "metrics.jsonl"))) == 2
  with open(os.path.join(model_dir, "config.gin")) as f:
    operative = f.read()
  assert "TRAIN_STEPS = 40" in operative and "train.train_steps = %TRAIN_STEPS" in operative
  assert "MeshConfig.expert = 4" in operative
  meta = checkpoints.read_metadata(model_dir)
  assert meta["vocabulary_fingerprint"].startswith("sentencepiece:sha256=")
  assert meta["model_config"]["num_experts"] == 8 and meta["mesh"] == {
    "data": 2,
    "expert": 4,
    "model": 1,
  }


def _cli(data_dir, module, *args):
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=_env(data_dir),
    capture_output=True,
    text=True,
    timeout=900,
  )
  return proc


def test_eval_cli_runs_validation_loss_and_fewshot(straight, prepared_data_dir, tmp_path):
  """The documented `python -m lifelong_moe_jax.eval` commands: runs/eval.gin and runs/fewshot.gin
  in one process; the validation loss equals the in-training eval of the same checkpoint."""
  model_dir, _ = straight
  eval_dir, fewshot_dir = str(tmp_path / "eval_run"), str(tmp_path / "fewshot")
  proc = _cli(
    prepared_data_dir,
    "lifelong_moe_jax.evaluate",
    "--gin_file=models/tiny.gin",
    "--gin_file=runs/eval.gin",
    "--gin_file=runs/fewshot.gin",
    f'--gin.MODEL_DIR="{eval_dir}"',
    f'--gin.CHECKPOINT_PATH="{model_dir}"',
    '--gin.MIXTURE_OR_TASK_NAME="lifelong_all"',
    "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
    "--gin.BATCH_SIZE=8",
    "--gin.evaluate_checkpoint.max_batches=1",
    "--gin.NUM_SHOTS=1",
    "--gin.MAX_EXAMPLES=8",
    "--gin.FEWSHOT_TASKS=['fewshot_polarity']",
    f'--gin.OUTPUT_DIR="{fewshot_dir}"',
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  in_training = summaries.read_jsonl(os.path.join(model_dir, "eval", "metrics.jsonl"))[0]
  standalone = summaries.read_jsonl(os.path.join(eval_dir, "eval", "metrics.jsonl"))
  assert [r["step"] for r in standalone] == [40]
  assert standalone[0]["lifelong_wiki_en/loss"] == pytest.approx(
    in_training["lifelong_wiki_en/loss"], rel=1e-5
  )
  with open(os.path.join(fewshot_dir, "fewshot-k1.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["step"] == 40 and summary["k"] == 1
  scores = summary["results"]["fewshot_polarity"]
  assert scores["num_examples"] == 8 and scores["chance"] == 50.0
  with open(os.path.join(fewshot_dir, "fewshot_polarity-k1.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 8
  assert scores["accuracy"] == pytest.approx(100 * np.mean([r["is_correct"] for r in records]))
  assert "fewshot_polarity" in proc.stdout and "chance" in proc.stdout


def test_eval_cli_without_a_job_is_a_clear_error(prepared_data_dir):
  proc = _cli(prepared_data_dir, "lifelong_moe_jax.evaluate", "--gin_file=models/tiny.gin")
  assert proc.returncode != 0
  assert "Nothing to evaluate: pass --gin_file=runs/eval.gin" in proc.stderr


def test_infer_cli_documented_commands(straight, prepared_data_dir, tmp_path):
  """docs/inference.md: score mode, predict mode and --prompt on a trained checkpoint."""
  model_dir, _ = straight
  out = str(tmp_path / "infer")
  base = [
    "--gin_file=runs/infer.gin",
    f'--gin.CHECKPOINT_PATH="{model_dir}"',
    f'--gin.OUTPUT_DIR="{out}"',
  ]
  score = _cli(
    prepared_data_dir,
    "lifelong_moe_jax.infer",
    *base,
    '--gin.MIXTURE_OR_TASK_NAME="fewshot_polarity"',
    '--gin.INFER_MODE="score"',
    "--gin.infer.max_examples=8",
  )
  assert score.returncode == 0, score.stderr[-5000:]
  with open(os.path.join(out, "fewshot_polarity-score.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 8 and all({"inputs", "targets", "score"} <= set(r) for r in rows)
  assert all(r["score"] < 0 for r in rows)  # log-likelihoods
  predict = _cli(
    prepared_data_dir,
    "lifelong_moe_jax.infer",
    *base,
    '--gin.MIXTURE_OR_TASK_NAME="lifelong_dialog_en"',
    '--gin.INFER_MODE="predict"',
    "--gin.infer.max_examples=8",
    "--gin.infer.max_decode_len=8",
  )
  assert predict.returncode == 0, predict.stderr[-5000:]
  with open(os.path.join(out, "lifelong_dialog_en-predict.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 8 and all(isinstance(r["prediction"], str) for r in rows)
  prompt = _cli(
    prepared_data_dir,
    "lifelong_moe_jax.infer",
    *base,
    "--prompt",
    "def fibonacci(n):",
    "--gin.infer.max_decode_len=8",
  )
  assert prompt.returncode == 0, prompt.stderr[-5000:]
  assert "def fibonacci(n):" in prompt.stdout


def test_mismatched_cli_checkpoint_names_params(straight):
  model_dir, _ = straight
  config = ModelConfig(**dict(checkpoints.read_metadata(model_dir)["model_config"], num_experts=4))
  trainer = trainer_lib.Trainer(
    lm.LanguageModel(config),
    pt.Partitioner(pt.create_mesh(pt.MeshConfig(2, 4, 1))),
    optimizers.create_optimizer("adafactor", optimizers.learning_rate_schedule()),
  )
  with pytest.raises(
    checkpoints.CheckpointMismatchError,
    match=r"params/layers_1/moe/router/kernel: checkpoint shape \(32, 8\)",
  ):
    trainer.restore_or_initialize(checkpoint_manager.Checkpointer(model_dir))


def test_bad_gin_fails_before_writing_anything(prepared_data_dir, tmp_path):
  unknown_dir, missing_dir = tmp_path / "unknown", tmp_path / "missing"
  unknown = subprocess.Popen(
    _command(unknown_dir, 5, "--gin.train.no_such_setting=3"),
    cwd=REPO,
    env=_env(prepared_data_dir),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  missing_cmd = [
    a
    for a in _command(missing_dir, 5)
    if not a.startswith(("--gin.TRAIN_STEPS", "--gin.BATCH_SIZE"))
  ]
  missing = subprocess.Popen(
    missing_cmd,
    cwd=REPO,
    env=_env(prepared_data_dir),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _, unknown_err = unknown.communicate(timeout=300)
  _, missing_err = missing.communicate(timeout=300)
  assert unknown.returncode != 0 and "no_such_setting" in unknown_err, unknown_err[-3000:]
  assert missing.returncode != 0, missing_err[-3000:]
  assert "Missing required gin macro(s): BATCH_SIZE, TRAIN_STEPS" in missing_err
  assert "Traceback" not in missing_err
  assert not unknown_dir.exists() and not missing_dir.exists()
  assert json.dumps(os.listdir(tmp_path)) == "[]"


class _AnchorL2:
  """Minimal regularizer: weight * squared distance to the params at the start."""

  name = "anchor_l2"

  def init_state(self, ctx):
    return {"anchor": ctx.params}, {"anchor": ctx.params_axes}

  def __call__(self, params, batch, student_logits, aux_state, rng):
    sq = sum(
      jax.numpy.sum((p - a) ** 2)
      for p, a in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(aux_state["anchor"])
      )
    )
    return 0.1 * sq, {"sq_distance": sq}


def test_python_api_hooks_and_resume(prepared_data_dir, tmp_path):
  """``train.train`` from Python: given initial params, a regularizer, an optimizer wrapper and
  extra metadata; a second call resumes from the checkpoint instead of the initial state."""
  import optax  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import train  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.data import vocab  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import train_state as ts  # pylint: disable=import-outside-toplevel

  config = ModelConfig(
    embed_dim=32,
    num_layers=2,
    num_heads=2,
    head_dim=16,
    mlp_dim=64,
    num_experts=8,
    group_size=64,
    max_length=64,
  )
  vocab_size = vocab.get_vocabulary(data_dir=prepared_data_dir).vocab_size
  model = lm.build_model(config, vocab_size)
  params = jax.tree_util.tree_map(
    lambda x: x * 0.5,
    jax.device_get(__import__("flax").linen.unbox(model.init(jax.random.PRNGKey(9)))),
  )
  initial = ts.TrainState(
    step=np.int32(0), params=params, opt_state=None, rng=jax.random.PRNGKey(0)
  )
  frozen = lambda tx: optax.multi_transform(  # noqa: E731
    {"train": tx, "frozen": optax.set_to_zero()},
    lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if "router" in param_tree.path_str(path) else "train", p
    ),
  )
  kwargs = dict(
    model_dir=str(tmp_path / "run"),
    mixture_or_task_name="lifelong_dialog_en",
    task_feature_lengths={"targets": 32},
    batch_size=8,
    model_config=config,
    mesh_config=pt.MeshConfig(2, 4, 1),
    data_dir=prepared_data_dir,
    optimizer=optimizers.create_optimizer(
      "adamw", optimizers.learning_rate_schedule("constant", 1e-3, warmup_steps=0)
    ),
    checkpoint_config=checkpoints.CheckpointConfig(save_interval_steps=2),
    summary_every_steps=1,
    regularizers=[_AnchorL2()],
    optimizer_wrapper=frozen,
    initial_state=initial,
    extra_metadata={"phase_record": {"phase": "A"}},
  )
  first = train.train(train_steps=4, **kwargs)
  assert first.start_source == "initial_state" and int(first.state.step) == 4
  router = "layers_1/moe/router/kernel"
  flat = lambda tree: {
    param_tree.path_str(p): v
    for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]  # noqa: E731
  }
  np.testing.assert_array_equal(flat(first.state.params)[router], flat(params)[router])
  meta = checkpoints.read_metadata(str(tmp_path / "run"))
  assert meta["phase_record"] == {"phase": "A"} and meta["step"] == 4
  records = summaries.read_jsonl(str(tmp_path / "run" / "train" / "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert records[0]["reg/anchor_l2/sq_distance"] == 0.0 < records[-1]["reg/anchor_l2/sq_distance"]
  # A second call finds the checkpoint and ignores initial_state (nothing left to train).
  second = train.train(train_steps=4, **kwargs)
  assert second.start_source == "resumed" and second.start_step == 4
  np.testing.assert_array_equal(
    flat(second.state.params)["layers_0/mlp/wi"], flat(first.state.params)["layers_0/mlp/wi"]
  )
  with pytest.raises(ValueError, match="reserved"):
    train.train(train_steps=6, **dict(kwargs, extra_metadata={"step": 1}))


def _tree_snapshot(root):
  """``{relative path: bytes}`` of every file under ``root`` (a refused run must change none)."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_readme_surgery_command_on_a_train_cli_checkpoint(straight, prepared_data_dir, tmp_path):
  """The README's surgery command on a run written by the train CLI (it has a config.gin and was
  trained on MeshConfig.expert=4), run in a 1-device process: 8 -> 12 experts, old slices and
  shared params bit-equal, and the train CLI resumes from the output."""
  model_dir, _ = straight
  output = str(tmp_path / "expanded")
  env = dict(_env(prepared_data_dir), XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [
    sys.executable,
    "-m",
    "lifelong_moe_jax.surgery",
    f"--checkpoint={model_dir}/checkpoints/40",
    f"--output={output}",
    "--add_experts=4",
    "--init=copy",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Expanded 8 -> 12 experts per MoE layer" in proc.stdout
  old = _restore_state(model_dir, 40)
  new = _restore_state(output, 40)
  old_wi = old.params["layers_1"]["moe"]["wi"]
  new_wi = new.params["layers_1"]["moe"]["wi"]
  assert new_wi.shape[0] == 12
  np.testing.assert_array_equal(new_wi[:8], old_wi)
  np.testing.assert_array_equal(
    new.params["layers_0"]["mlp"]["wi"], old.params["layers_0"]["mlp"]["wi"]
  )
  # The train CLI resumes from the expanded run folder (model config from the flags).
  _run(prepared_data_dir, output, 42, "--gin.ModelConfig.num_experts=12")
  assert int(checkpoints.read_metadata(output)["step"]) == 42


def test_refused_resume_leaves_the_run_untouched(straight, prepared_data_dir):
  """A resume whose input pipeline differs (another batch size) is refused before anything is
  written: config.gin, checkpoints and metrics stay byte-identical."""
  model_dir, _ = straight
  before = _tree_snapshot(model_dir)
  proc = subprocess.run(
    _command(model_dir, 50, "--gin.BATCH_SIZE=16"),
    cwd=REPO,
    env=_env(prepared_data_dir),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode != 0
  assert "input pipeline changed" in proc.stderr and "batch_size" in proc.stderr
  assert _tree_snapshot(model_dir) == before
