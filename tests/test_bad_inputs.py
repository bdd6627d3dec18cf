"""Bad inputs to the CLIs: one ``error:`` line on stderr, the documented exit code, nothing written.

Table-driven (issue 10): every case runs a real CLI (``python -m lifelong_moe_jax.<cli>``) in a
subprocess and asserts

* exactly one line on stderr, ``error: <message>``, matching the case's regex: the CLIs keep
  TensorFlow's start-up logs and their own INFO lines off stderr until the checks have passed;
* the exit code: 2 for usage/configuration errors, 1 for runtime failures (``gin_utils.run``);
* the file tree under the case's folders (its own folder and the shared runs it reads) is
  byte-identical before and after: a refusal writes nothing.

The runs the cases read are built once per module with the CLIs themselves (1 CPU device, tiny
models, a shared XLA compilation cache): a MoE run (``train``, 2 steps), a dense run (1 step) and
an expansion of the MoE run (``surgery``). Cases run three at a time in a module fixture (each
process spends most of its time importing TensorFlow and JAX); each test checks one case.
docs/reliability.md ("Errors") lists the cases with their messages.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import string
import subprocess
import sys
from typing import Callable

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPILE_CACHE = os.path.join("/tmp", "lifelong_moe_jax_test_xla_cache")
WORKERS = 3
TIMEOUT_S = 600

TRAIN = [
  "lifelong_moe_jax.train",
  "--gin_file=models/tiny.gin",
  "--gin_file=runs/pretrain.gin",
  "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
  "--gin.TRAIN_STEPS=2",
  "--gin.train.eval_every_steps=0",
]
TRAIN_ALL = TRAIN + ['--gin.MIXTURE_OR_TASK_NAME="lifelong_all"']
NEW_RUN = TRAIN_ALL + ["--gin.BATCH_SIZE=8", '--gin.MODEL_DIR="$CASE/run"']
RESUME = TRAIN_ALL + ["--gin.BATCH_SIZE=2", '--gin.MODEL_DIR="$CASE/run"']  # as the MOE run
SURGERY = ["lifelong_moe_jax.surgery", "--output=$CASE/out"]
INFER = ["lifelong_moe_jax.infer", "--gin_file=runs/infer.gin"]
LIFELONG = [
  "lifelong_moe_jax.run_lifelong",
  "--gin_file=lifelong/tiny_test.gin",
  '--gin.MODEL_DIR="$CASE/run"',
]
USER_DATA = TRAIN + [
  "--gin.BATCH_SIZE=2",
  '--gin.MIXTURE_OR_TASK_NAME="lifelong_mine"',
  '--gin.MODEL_DIR="$CASE/run"',
  "--data_dir=$CASE/data",
  "--gin.register_folder_distributions.folders={'mine': '$CASE/mine'}",
]
LONG_PROMPT = " ".join(f"word{i}" for i in range(150))  # about 490 tokens > 256 - 1 - 64


# ------------------------------------------------------------------------------- case set-ups
def _copy_moe_run(case: pathlib.Path, runs: dict[str, str]) -> None:
  shutil.copytree(runs["MOE"], case / "run", symlinks=True)


def _user_data_dir(case: pathlib.Path, runs: dict[str, str]) -> None:
  """A data dir holding the prepared corpora (symlinked) so the user distribution builds there."""
  data, prepared = case / "data", pathlib.Path(runs["DATA"])
  (data / "tfds" / "lifelong_text").mkdir(parents=True)
  (data / ".lock").touch()  # as in any prepared data dir
  for name in ("vocab", "wiki_en", "code_py", "dialog_en"):
    (data / name).symlink_to(prepared / name)
    if name != "vocab":
      (data / "tfds" / "lifelong_text" / name).symlink_to(
        prepared / "tfds" / "lifelong_text" / name
      )


def _empty_folder(case, runs):
  _user_data_dir(case, runs)
  (case / "mine").mkdir()


def _malformed_jsonl(case, runs):
  _user_data_dir(case, runs)
  (case / "mine").mkdir()
  (case / "mine" / "docs.jsonl").write_text('{"text": "a fine document"}\n{"text": broken\n')


def _empty_data_dir(case, runs):
  (case / "data").mkdir()


def _vocab_only_data_dir(case, runs):
  (case / "data").mkdir()
  shutil.copytree(os.path.join(runs["DATA"], "vocab"), case / "data" / "vocab")


def _occupied_output(case, runs):
  (case / "out").mkdir()
  (case / "out" / "notes.txt").write_text("not a checkpoint\n")


def _existing_run_folder(case, runs):
  (case / "run").mkdir()
  (case / "run" / "notes.txt").write_text("a lifelong run folder whose methods never ran\n")


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input.

  Attributes:
    id: test id.
    args: ``python -m`` arguments; ``$CASE`` (the case's folder), ``$MOE``, ``$DENSE``,
      ``$EXPANDED`` (the shared runs) and ``$DATA`` (the prepared data dir) are substituted.
    pattern: regex the stderr line must match after ``error: ``.
    code: expected exit code.
    devices: fake CPU devices (8 for the mesh cases).
    setup: ``fn(case_dir, runs)`` creating the case's inputs before the "before" snapshot.
  """

  id: str
  args: tuple[str, ...]
  pattern: str
  code: int = 2
  devices: int = 1
  setup: Callable[[pathlib.Path, dict[str, str]], None] | None = None


CASES = (
  # ---- command line and gin
  Case(
    "gin_typo",
    (*NEW_RUN, "--gin.ModelConfig.num_experst=4"),
    r"Invalid gin configuration: Configurable 'ModelConfig' doesn't have a parameter named "
    r"'num_experst' \(in bindings string line \d+: ModelConfig\.num_experst = 4\)\. Check the "
    r"spelling",
  ),
  Case(
    "missing_required_macro",
    (*TRAIN_ALL, '--gin.MODEL_DIR="$CASE/run"'),
    r"Missing required gin macro\(s\): BATCH_SIZE\. Set each one, e\.g\. "
    r"--gin\.BATCH_SIZE=\.\.\.",
  ),
  # ---- model, mesh and batch
  Case(
    "mesh_product",
    (*NEW_RUN, "--gin.MeshConfig.data=3"),
    r"Mesh data=3 x expert=1 x model=1 = 3 devices, but 8 are available\. Set "
    r"MeshConfig\.data/expert/model so their product is 8",
    devices=8,
  ),
  Case(
    "experts_vs_expert_axis",
    (*NEW_RUN, "--gin.MeshConfig.expert=4", "--gin.ModelConfig.num_experts=6"),
    r"num_experts=6 is not divisible by the expert mesh axis \(4\): use a multiple of 4 "
    r"experts or set MeshConfig\.expert to a divisor of 6\.",
    devices=8,
  ),
  Case(
    "top_k_above_experts",
    (*NEW_RUN, "--gin.ModelConfig.top_k=9"),
    r"ModelConfig\.top_k=9 exceeds num_experts=8: every token must pick distinct experts\. "
    r"Set ModelConfig\.top_k <= 8 or add experts\.$",
  ),
  Case(
    "batch_vs_mesh",
    (*TRAIN_ALL, "--gin.BATCH_SIZE=4", '--gin.MODEL_DIR="$CASE/run"'),
    r"Global batch size 4 is not divisible by data x expert = 8 batch shards; use a multiple "
    r"of 8\.",
    devices=8,
  ),
  # ---- data
  Case(
    "unknown_task",
    (
      *TRAIN,
      "--gin.BATCH_SIZE=2",
      '--gin.MODEL_DIR="$CASE/run"',
      '--gin.MIXTURE_OR_TASK_NAME="lifelong_no_such"',
    ),
    r"Unknown task or mixture 'lifelong_no_such'\. Registered tasks: .*lifelong_wiki_en.*"
    r"register_folder_distributions\.folders \(see docs/data\.md\)\.$",
  ),
  Case(
    "unprepared_data_dir",
    (*RESUME, "--data_dir=$CASE/data"),
    r"SentencePiece model \S+/data/vocab/spm\.model not found\. Build it with: python -m "
    r"lifelong_moe_jax\.data\.prepare --data_dir \S+/data",
    setup=_empty_data_dir,
  ),
  Case(
    "unprepared_corpora",
    (*RESUME, "--data_dir=$CASE/data"),
    r"The data of 'lifelong_all' is not prepared in \S+/data \(.*\)\. Run: python -m "
    r"lifelong_moe_jax\.data\.prepare --data_dir \S+/data --distributions "
    r"code_py,dialog_en,wiki_en$",
    setup=_vocab_only_data_dir,
  ),
  Case(
    "user_distribution_empty_folder",
    USER_DATA,
    r"Corpus folder \S+/mine contains no \.txt or \.jsonl files\.",
    setup=_empty_folder,
  ),
  Case(
    "user_distribution_malformed",
    USER_DATA,
    r"Distribution 'mine': \S+/mine/docs\.jsonl:2: expected a JSON object with a string "
    r"'text' field",
    setup=_malformed_jsonl,
  ),
  # ---- checkpoints: resume, vocabulary, surgery, infer
  Case(
    "refused_resume",
    (*TRAIN_ALL, "--gin.BATCH_SIZE=4", '--gin.MODEL_DIR="$CASE/run"'),
    r"Cannot resume \S+/run/checkpoints/2 exactly: the input pipeline changed \(batch_size: "
    r"checkpoint 2 vs now 4\)\. Use the original settings, or start a new MODEL_DIR",
    setup=_copy_moe_run,
  ),
  Case(
    "train_vocabulary_mismatch",
    (*RESUME, "--gin.get_vocabulary.kind='byte'"),
    r"Vocabulary mismatch: the checkpoint was trained with vocabulary 'sentencepiece:sha256="
    r"[0-9a-f]+:extra_ids=0' but the current vocabulary is 'byte:extra_ids=0'\.",
    setup=_copy_moe_run,
  ),
  Case(
    "surgery_missing_checkpoint",
    (*SURGERY, "--checkpoint=$CASE/no_such_run", "--add_experts=4"),
    r"No checkpoint at \S+/no_such_run: the folder does not exist\.",
  ),
  Case(
    "surgery_dense_checkpoint",
    (*SURGERY, "--checkpoint=$DENSE", "--add_experts=4"),
    r"\S+/checkpoints/1 holds a dense model \(num_experts=0\): nothing to expand\.",
  ),
  Case(
    "surgery_already_expanded",
    (*SURGERY, "--checkpoint=$EXPANDED", "--add_experts=4"),
    r"\S+/checkpoints/2 was already expanded for phase 'expand_at_step_2' \(phase record: "
    r"\{'pretrain': \(0, 8\), 'expand_at_step_2': \(8, 12\)\}\); expanding again would add "
    r"experts twice\.",
  ),
  Case(
    "surgery_occupied_output",
    (*SURGERY, "--checkpoint=$MOE", "--add_experts=4"),
    r"--output \S+/out exists but holds no readable checkpoint \(.*\); choose another folder "
    r"or delete it\.$",
    setup=_occupied_output,
  ),
  Case(
    "infer_missing_checkpoint",
    (*INFER, '--gin.CHECKPOINT_PATH="$CASE/no_such_run"', "--prompt=hello"),
    r"No checkpoint at \S+/no_such_run: the folder does not exist\.",
  ),
  Case(
    "prompt_too_long",
    (*INFER, '--gin.CHECKPOINT_PATH="$MOE"', f"--prompt={LONG_PROMPT}"),
    r"The prompt is \d{3} tokens but only 191 fit \(max_length 256 - 1 - max_decode_len 64\): "
    r"shorten the prompt to at most 191 tokens \(at most 254 with max_decode_len=1\); prompts "
    r"are never cut\.$",
  ),
  # ---- lifelong runner
  Case(
    "zero_expert_phase_under_lifelong_moe",
    (
      *LIFELONG,
      "--methods=lifelong_moe",
      '--gin.LifelongSchedule.phases=[{"name": "a", "mixture": "lifelong_wiki_en", '
      '"steps": 2}, {"name": "b", "mixture": "lifelong_code_py", "steps": 2, '
      '"add_experts": 0}]',
    ),
    r"Method 'lifelong_moe' freezes every existing expert at a phase start, but phase\(s\) "
    r"\['b'\] add no experts",
  ),
  Case(
    "report_only_unknown_method",
    (*LIFELONG, "--methods=bogus", "--report_only"),
    r"Unknown lifelong method 'bogus'; known: \[.*'lifelong_moe'.*\]\.",
    setup=_existing_run_folder,
  ),
  Case(
    "report_only_method_never_ran",
    (*LIFELONG, "--methods=finetune", "--report_only"),
    r"--report_only: method\(s\) finetune have no finished phase in \S+/run \(methods with "
    r"results: none\); run them first",
    setup=_existing_run_folder,
  ),
)


# ------------------------------------------------------------------------------------ helpers
def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "LIFELONG_MOE_VERBOSE"}
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return env


def _run(args, devices: int = 1, data_dir: str | None = None) -> subprocess.CompletedProcess:
  env = _env(devices)
  if data_dir:
    env["LIFELONG_MOE_DATA_DIR"] = data_dir
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def tree(root: str | os.PathLike) -> dict[str, str]:
  """``{relative path: what it is}`` of everything under ``root`` (symlinks not followed): files
  by size and sha256, symlinks by target, folders by name."""
  out, root = {}, str(root)
  if not os.path.lexists(root):
    return out
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root)
      if os.path.islink(path):
        out[rel] = f"link -> {os.readlink(path)}"
      elif os.path.isdir(path):
        out[rel] = "dir"
      else:
        with open(path, "rb") as f:
          data = f.read()
        out[rel] = f"{len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}"
  return out


def _diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
  keys = sorted(set(before) | set(after))
  return [
    f"{k}: {before.get(k, 'absent')} -> {after.get(k, 'absent')}"
    for k in keys
    if before.get(k) != after.get(k)
  ]


@pytest.fixture(scope="module")
def runs(prepared_data_dir, tmp_path_factory) -> dict[str, str]:
  """The shared runs the cases read: MOE (train), DENSE (train), EXPANDED (surgery of MOE)."""
  root = tmp_path_factory.mktemp("bad_inputs_runs")
  paths = {
    "MOE": str(root / "moe"),
    "DENSE": str(root / "dense"),
    "EXPANDED": str(root / "expanded"),
    "DATA": prepared_data_dir,
  }
  base = TRAIN_ALL + ["--gin.BATCH_SIZE=2"]
  commands = {
    "MOE": base + [f'--gin.MODEL_DIR="{paths["MOE"]}"'],
    "DENSE": [a.replace("models/tiny.gin", "models/tiny_dense.gin") for a in base]
    + ["--gin.TRAIN_STEPS=1", f'--gin.MODEL_DIR="{paths["DENSE"]}"'],
  }
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    done = {name: pool.submit(_run, args, 1, prepared_data_dir) for name, args in commands.items()}
    for name, future in done.items():
      proc = future.result()
      assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
  proc = _run(
    [
      "lifelong_moe_jax.surgery",
      f"--checkpoint={paths['MOE']}",
      f"--output={paths['EXPANDED']}",
      "--add_experts=4",
    ],
    1,
    prepared_data_dir,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return paths


def _selected_cases(request) -> list[Case]:
  ids = {
    item.callspec.id
    for item in request.session.items
    if getattr(item, "originalname", None) == "test_bad_input"
    and getattr(item, "module", None) is request.module
  }
  return [c for c in CASES if c.id in ids]


@dataclasses.dataclass
class Outcome:
  proc: subprocess.CompletedProcess
  changes: list[str]


def _run_case(case: Case, runs: dict[str, str], folder: pathlib.Path) -> Outcome:
  folder.mkdir(parents=True)
  if case.setup is not None:
    case.setup(folder, runs)
  values = dict(runs, CASE=str(folder))
  args = [string.Template(a).substitute(values) for a in case.args]
  watched = [str(folder)] + [
    runs[k] for k in ("MOE", "DENSE", "EXPANDED") if any(f"${k}" in a for a in case.args)
  ]
  before = {w: tree(w) for w in watched}
  proc = _run(args, case.devices, runs["DATA"])
  changes = [f"{w}/{line}" for w in watched for line in _diff(before[w], tree(w))]
  return Outcome(proc, changes)


@pytest.fixture(scope="module")
def outcomes(request, runs, tmp_path_factory):
  """Runs the selected cases concurrently; ``{case id: Future[Outcome]}``."""
  root = tmp_path_factory.mktemp("bad_inputs_cases")
  pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
  futures = {c.id: pool.submit(_run_case, c, runs, root / c.id) for c in _selected_cases(request)}
  yield futures
  pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes):
  outcome = outcomes[case.id].result()
  proc = outcome.proc
  lines = proc.stderr.splitlines()
  assert proc.returncode == case.code, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert re.match(r"error: " + case.pattern, lines[0]), lines[0]
  assert outcome.changes == [], outcome.changes


def test_every_case_has_a_unique_id():
  assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------- the wrapper itself, without TF
WRAPPER_SCRIPT = """
from absl import flags
from lifelong_moe_jax import checkpoint_manifest
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.models.config import ModelConfig

flags.DEFINE_string("fail", None, "what to raise")


def main(argv):
  del argv
  fail = flags.FLAGS.fail
  if fail == "usage":
    ModelConfig(num_experts=8, top_k=9)  # a ValueError raised by the package: exit code 2
  if fail == "runtime":
    raise checkpoint_manifest.CheckpointDamagedError("step 4 is damaged.\\nRestore it.")
  if fail == "bug":
    return {}["a bug"]  # not the project's own error: Python's traceback
  print("ok")


gin_utils.run(main)
"""
TOP_K = (
  r"error: ModelConfig\.top_k=9 exceeds num_experts=8: every token must pick distinct "
  r"experts\."
)


@pytest.mark.parametrize(
  "args, env, code, first, last",
  [
    (["--fail=usage"], {}, 2, TOP_K, TOP_K),
    (
      ["--fail=runtime"],
      {},
      1,
      r"error: step 4 is damaged\. Restore it\.$",
      r"error: step 4 is damaged\. Restore it\.$",
    ),
    (["--fail=usage", "--verbose"], {}, 2, r"Traceback \(most recent call last\):$", TOP_K),
    (
      ["--fail=runtime"],
      {"LIFELONG_MOE_VERBOSE": "1"},
      1,
      r"Traceback \(most recent call",
      r"error: step 4 is damaged",
    ),
    (["--fail=bug"], {}, 1, r"Traceback \(most recent call last\):$", r"KeyError: 'a bug'$"),
    (
      ["--no_such_flag=1"],
      {},
      2,
      r"error: Unknown command line flag 'no_such_flag' \(see --helpfull for the flags\)\.$",
      None,
    ),
    (
      ["--gin.TRAIN_STEPS"],
      {},
      2,
      r"error: '--gin\.TRAIN_STEPS' has no value: write "
      r"--gin\.NAME=VALUE\.$",
      None,
    ),
    ([], {}, 0, None, None),
  ],
  ids=["usage", "runtime", "verbose_flag", "verbose_env", "bug", "bad_flag", "gin_flag", "ok"],
)
def test_run_wrapper(args, env, code, first, last):
  """``gin_utils.run``: one ``error:`` line (2 usage, 1 runtime), tracebacks only when verbose or
  for errors that are not the project's own; bad flags are usage errors."""
  full_env = dict(_env(1), **env)
  proc = subprocess.run(
    [sys.executable, "-c", WRAPPER_SCRIPT, *args],
    cwd=REPO,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  lines = proc.stderr.splitlines()
  assert proc.returncode == code, proc.stderr
  if first is None:
    assert lines == [], proc.stderr
    assert proc.stdout == "ok\n"
    return
  assert re.match(first, lines[0]), proc.stderr
  assert re.match(last or first, lines[-1]), proc.stderr
  if last is None or first == last:
    assert len(lines) == 1, proc.stderr


def test_nan_message_says_what_is_configured():
  from lifelong_moe_jax import cli_errors  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import trainer  # pylint: disable=import-outside-toplevel

  on = trainer.NonFiniteLossError(7, "loss", float("nan"), clip_grad_norm=1.0, learning_rate=0.01)
  assert (
    "Gradient clipping is already on (create_optimizer.clip_grad_norm = 1): lower the "
    "learning rate (0.01 at that step; learning_rate_schedule.peak_learning_rate) or the "
    "clipping threshold" in str(on)
  )
  assert "enable gradient clipping" not in str(on)
  off = trainer.NonFiniteLossError(7, "loss", float("nan"))
  assert "Gradient clipping is off (create_optimizer.clip_grad_norm = None): enable it" in str(off)
  assert cli_errors.exit_code_for(on) == cli_errors.RUNTIME_EXIT_CODE


def test_startup_filter_drops_only_tensorflow_start_up_lines():
  from lifelong_moe_jax import cli_startup  # pylint: disable=import-outside-toplevel

  captured = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796029585.927810   25271 port.cc:153] oneDNN custom operations are on.\n"
    "I0000 00:00:1796029585.929742   25271 cudart_stub.cc:31] Could not find cuda drivers.\n"
    "I0000 00:00:1796029878.569837   28818 cpu_feature_guard.cc:210] This TensorFlow binary is "
    "optimized.\nTo enable the following instructions: AVX2 FMA, rebuild TensorFlow.\n"
    "E0000 00:00:1796029878.569837   28818 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
    "E0000 00:00:1796029878.569837   28818 other.cc:1] a real error\n"
    "/x/y.py:3: UserWarning: a Python warning\n"
  )
  assert cli_startup.filter_noise(captured) == (
    "E0000 00:00:1796029878.569837   28818 other.cc:1] a real error\n"
    "/x/y.py:3: UserWarning: a Python warning\n"
  )
  assert (
    cli_startup.cli_module(["python", "-m", "lifelong_moe_jax.train", "--x"])
    == "lifelong_moe_jax.train"
  )
  assert cli_startup.cli_module(["python", "-X", "importtime", "-m", "a.b"]) == "a.b"
  assert cli_startup.cli_module(["python", "-c", "pass"]) is None
  assert cli_startup.cli_module(["pytest", "tests"]) is None
