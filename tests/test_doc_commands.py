"""Every shell command shown in README.md, launch/README.md and docs/*.md is run by a test.

The commands are read from the fenced code blocks of those files (```sh / ```bash, and unlabeled
blocks whose first line starts with a program such as ``python`` or ``make``), backslash
continuations joined, trailing ``# comments`` dropped, whitespace collapsed. ``REGISTRY`` maps each
such command to how it is covered:

* ``Run``: run here, as a subprocess, by ``test_documented_command_runs`` — the documented text
  itself, with its placeholder paths (``/tmp/run``, ``RUN``, ``./runs/demo``) pointed into one
  temporary folder and tiny-size overrides appended (later ``--gin_file``/``--gin.*`` values win).
  The entries run in registry order as one chain, each on the real outputs of the ones before it:
  data.prepare -> train -> train (resumed) -> evaluate -> infer -> surgery -> surgery ->
  run_lifelong -> run_lifelong --report_only, plus launcher ``--dry_run``s. Each must exit 0 and
  produce the files/lines its entry names. (A later entry needs the earlier ones: select the chain
  as a whole, not one entry with ``-k``.)
* ``Elsewhere``: an existing test runs it (``test_elsewhere_tests_exist`` checks that the test
  exists and that its code — with the fixtures and module functions it reaches and the module's
  constants — contains the command's key words).
* ``Excluded``: not run by the test suite, with the reason.

A command in the docs without an entry fails ``test_every_documented_command_is_registered``; an
entry that no doc shows any more fails ``test_registry_has_no_stale_entries``.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

from typing import Callable

import pytest

from cli_env import COMPILE_CACHE, cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600

# Unlabeled blocks are shell only when their first line starts with one of these programs (the
# others show output, file trees, gin or formulas).
PROGRAMS = (
  "python",
  "python3",
  ".venv/bin/python",
  "make",
  "pip",
  "apt-get",
  "sbatch",
  "bash",
  "srun",
  "gcloud",
  "xpk",
)
SHELL_LANGUAGES = ("sh", "bash", "shell", "console")


def doc_files() -> list[str]:
  """README.md, launch/README.md and docs/*.md, relative to the repository."""
  docs = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
  return ["README.md", os.path.join("launch", "README.md"), *docs]


def _strip_comment(line: str) -> str:
  """``line`` without a trailing unquoted ``# comment``."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      if ch == "\\" and quote == '"':
        continue
      if ch == quote and (i == 0 or line[i - 1] != "\\"):
        quote = None
    elif ch in "'\"" and (i == 0 or line[i - 1] != "\\"):
      quote = ch
    elif ch == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i]
  return line


def normalize(command: str) -> str:
  return " ".join(_strip_comment(command).split())


def _block_commands(lines: list[str]) -> list[tuple[int, str]]:
  """``(offset of the first line, normalised command)`` of one shell block."""
  out, pending, start = [], "", 0
  for offset, raw in enumerate(lines):
    line = raw.rstrip()
    if not pending:
      start = offset
      if not line.strip() or line.lstrip().startswith("#"):
        continue
    if line.endswith("\\"):
      pending += line[:-1] + " "
      continue
    command = normalize(pending + line)
    pending = ""
    if command:
      out.append((start, command))
  if pending.strip():
    out.append((start, normalize(pending)))
  return out


def extract_commands(text: str) -> list[tuple[int, str]]:
  """``(line number, normalised command)`` of every shell command in a markdown text."""
  lines = text.split("\n")
  out, i = [], 0
  while i < len(lines):
    m = re.match(r"^\s*```\s*([\w+-]*)", lines[i])
    if not m:
      i += 1
      continue
    language = m.group(1).lower()
    end = i + 1
    while end < len(lines) and not re.match(r"^\s*```", lines[end]):
      end += 1
    body = lines[i + 1 : end]
    first = next((line.strip() for line in body if line.strip()), "")
    if language in SHELL_LANGUAGES or (not language and first.split(" ")[0] in PROGRAMS):
      out += [(i + 2 + offset, command) for offset, command in _block_commands(body)]
    i = end + 1
  return out


def documented_commands() -> dict[str, list[str]]:
  """``{normalised command: ["file:line", ...]}`` over every doc file."""
  found: dict[str, list[str]] = {}
  for rel in doc_files():
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
      text = f.read()
    for line, command in extract_commands(text):
      found.setdefault(command, []).append(f"{rel}:{line}")
  return found


# ------------------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Run:
  """Run here (in registry order, as one chain) on the outputs of the entries before it.

  ``replace``: ``(old, new)`` applied in order to the documented text (placeholder paths); ``@TMP@``
  and ``@DATA@`` in ``new``/``append`` are the chain folder and the prepared data dir. A synopsis's
  optional ``[...]`` parts are all given (brackets removed). ``append``: tiny-size overrides added
  at the end. ``files``: globs under ``@TMP@`` that the command must (re)write; ``output``: lines
  it must print (stdout or stderr); ``check``: further assertions on the chain folder.
  """

  replace: tuple[tuple[str, str], ...] = ()
  append: tuple[str, ...] = ()
  files: tuple[str, ...] = ()
  output: tuple[str, ...] = ()
  check: Callable[[str], None] | None = None  # called with the chain folder


@dataclasses.dataclass(frozen=True)
class Elsewhere:
  """Run by an existing test ``tests/<file>.py::<test>``, whose code (with its fixtures and the
  module's helpers and constants) must contain every one of ``needles``."""

  test: str
  needles: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Excluded:
  reason: str


TMP_RUN = (('\\"/tmp/run\\"', '\\"@TMP@/run\\"'),)
TINY_TRAIN = (
  "--gin.TRAIN_STEPS=6",
  "--gin.train.summary_every_steps=2",
  "--gin.train.eval_max_batches=1",
)
FEWSHOT_TINY = ("--gin.MAX_EXAMPLES=8", "--gin.FEWSHOT_TASKS=['fewshot_polarity']")
TINY_PHASES = (
  '[{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 2},'
  ' {"name": "code_py", "mixture": "lifelong_code_py", "steps": 2, "add_experts": 2}]'
)
TINY_LIFELONG = (
  "--gin_file=lifelong/tiny_test.gin",  # after demo_cpu.gin: its tiny model and schedule win
  f"--gin.LifelongSchedule.phases={TINY_PHASES}",
  "--gin.LifelongSchedule.eval_max_batches=1",
  "--gin.FewshotEval.enabled=False",
  f"--gin.RunnerConfig.compilation_cache_dir='{COMPILE_CACHE}'",
  "--data_dir=@DATA@",
)


def _three_methods_complete(tmp: str) -> None:
  with open(os.path.join(tmp, "demo", "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["phase_names"] == ["wiki_en", "code_py"]
  for method in ("lifelong_moe", "finetune", "l2"):
    assert report["methods"][method]["complete"], method
  assert report["methods"]["lifelong_moe"]["experts_per_layer"] == [[2], [4]]


DEMO_DIR = (('\\"./runs/demo\\"', '\\"@TMP@/demo\\"'),)
LIFELONG_FILES = ("demo/report.json", "demo/report.md", "demo/forgetting.png")

REGISTRY: dict[str, Run | Elsewhere | Excluded] = {
  # --- the chain ------------------------------------------------------------------------------
  "python -m lifelong_moe_jax.data.prepare": Run(
    append=("--data_dir", "@DATA@"), output=("vocabulary",)
  ),
  "python -m lifelong_moe_jax.data.prepare [--data_dir DIR] [--distributions "
  "wiki_en,code_py,dialog_en] [--vocab_size 8000] [--skip_vocab] [--skip_tfds] [--force] "
  "[--verbose]": Run(
    replace=(("DIR", "@TMP@/prepared"),),
    append=("--distributions", "dialog_en"),  # one distribution is enough (30 s for three)
    files=("prepared/dialog_en/COMPLETE.json",),
    output=("dialog_en",),
  ),
  "python -m lifelong_moe_jax.model_info --gin_file=models/glam_0.1b_64e.gin": Run(
    output=("total_params", "experts=64")
  ),
  # docs/training.md: 6 steps on data=2 x expert=4 ...
  "python -m lifelong_moe_jax.train --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin "
  '--gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"lifelong_all\\" '
  "--gin.TASK_FEATURE_LENGTHS=\"{'targets': 64}\" --gin.TRAIN_STEPS=100 --gin.BATCH_SIZE=8 "
  "--gin.MeshConfig.expert=4": Run(
    replace=TMP_RUN,
    append=TINY_TRAIN,
    files=("run/checkpoints/6", "run/config.gin", "run/train/metrics.jsonl"),
  ),
  # ... then README's command resumes the same run to step 8 on the default mesh (data=8).
  "python -m lifelong_moe_jax.train --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin "
  '--gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"lifelong_all\\" '
  "--gin.TASK_FEATURE_LENGTHS=\"{'targets': 64}\" --gin.TRAIN_STEPS=100 --gin.BATCH_SIZE=8": Run(
    replace=TMP_RUN,
    append=(*TINY_TRAIN, "--gin.TRAIN_STEPS=8"),
    files=("run/checkpoints/8",),
    output=("resumed at step 6",),
  ),
  "python -m lifelong_moe_jax.evaluate --gin_file=models/tiny.gin --gin_file=runs/eval.gin "
  '--gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"lifelong_all\\" '
  "--gin.TASK_FEATURE_LENGTHS=\"{'targets': 64}\" --gin.BATCH_SIZE=8 "
  '[--gin.CHECKPOINT_PATH=\\"...\\"]': Run(
    replace=(*TMP_RUN, ("...", "@TMP@/run/checkpoints/6")),
    append=("--gin.evaluate_checkpoint.max_batches=1",),
    files=("run/eval/metrics.jsonl",),
  ),
  "python -m lifelong_moe_jax.evaluate --gin_file=runs/fewshot.gin "
  '--gin.CHECKPOINT_PATH=\\"/tmp/run\\"': Run(
    replace=TMP_RUN,
    append=FEWSHOT_TINY,
    files=("run/fewshot/fewshot-k1.json", "run/fewshot/fewshot_polarity-k1.jsonl"),
    output=("fewshot_polarity",),
  ),
  "python -m lifelong_moe_jax.evaluate --gin_file=runs/fewshot.gin "
  '--gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.NUM_SHOTS=1 --gin.MAX_EXAMPLES=100 '
  "--gin.FEWSHOT_TASKS=\"['fewshot_polarity']\"": Run(
    replace=TMP_RUN,
    append=FEWSHOT_TINY,
    files=("run/fewshot/fewshot-k1.json", "run/fewshot/fewshot_polarity-k1.jsonl"),
    output=("fewshot_polarity",),
  ),
  "python -m lifelong_moe_jax.infer --gin_file=runs/infer.gin "
  '--gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"lifelong_dialog_en\\" '
  '--gin.INFER_MODE=\\"score\\"': Run(
    replace=TMP_RUN,
    append=("--gin.infer.max_examples=4",),
    files=("run/infer/lifelong_dialog_en-score.jsonl",),
  ),
  "python -m lifelong_moe_jax.infer --gin_file=runs/infer.gin "
  '--gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"fewshot_polarity\\" '
  '--gin.INFER_MODE=\\"score\\"': Run(
    replace=TMP_RUN,
    append=("--gin.infer.max_examples=4",),
    files=("run/infer/fewshot_polarity-score.jsonl",),
  ),
  "python -m lifelong_moe_jax.infer --gin_file=runs/infer.gin "
  '--gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"lifelong_dialog_en\\" '
  '--gin.INFER_MODE=\\"predict\\" --gin.infer.max_examples=64': Run(
    replace=TMP_RUN,
    append=("--gin.infer.max_examples=4", "--gin.infer.max_decode_len=8"),
    files=("run/infer/lifelong_dialog_en-predict.jsonl",),
  ),
  "python -m lifelong_moe_jax.infer --gin_file=runs/infer.gin "
  '--gin.CHECKPOINT_PATH=\\"/tmp/run\\" --prompt "def fibonacci(n):"': Run(
    replace=TMP_RUN, append=("--gin.infer.max_decode_len=8",), output=("def fibonacci(n):",)
  ),
  "python -m lifelong_moe_jax.surgery --checkpoint=RUN/checkpoints/1000 --output=RUN_E8 "
  "--add_experts=4 --init=copy": Run(
    replace=(("RUN/checkpoints/1000", "@TMP@/run/checkpoints/8"), ("RUN_E8", "@TMP@/run_e8")),
    files=("run_e8/checkpoints/8",),
    output=("Expanded 8 -> 12 experts per MoE layer",),
  ),
  # the synopsis, every option given, on the README command's output: 12 -> 16 experts
  "python -m lifelong_moe_jax.surgery --checkpoint=RUN/checkpoints/1000 --output=RUN_E8 "
  "--add_experts=4 --init=copy [--noise_scale=0.01] [--phase_name=NAME] [--seed=0] "
  "[--gin_file=...] [--gin.MeshConfig.expert=4]": Run(
    replace=(
      ("RUN/checkpoints/1000", "@TMP@/run_e8/checkpoints/8"),
      ("RUN_E8", "@TMP@/run_e12"),
      ("--gin_file=...", "--gin_file=models/tiny.gin"),
    ),
    files=("run_e12/checkpoints/8",),
    output=("Expanded 12 -> 16 experts per MoE layer",),
  ),
  # README: the demo schedule with three methods, shrunk to the tiny model, 2 phases x 2 steps ...
  "python -m lifelong_moe_jax.run_lifelong --gin_file=lifelong/demo_cpu.gin "
  '--gin.MODEL_DIR=\\"./runs/demo\\" --methods=lifelong_moe,finetune,l2': Run(
    replace=DEMO_DIR,
    append=TINY_LIFELONG,
    files=(*LIFELONG_FILES, "demo/l2/phase_1_code_py/phase_result.json"),
    check=_three_methods_complete,
  ),
  # ... and docs/lifelong_runner.md's synopsis, every option given: rebuilds its report.
  "python -m lifelong_moe_jax.run_lifelong --gin_file=lifelong/demo_cpu.gin "
  '--gin.MODEL_DIR=\\"./runs/demo\\" [--methods lifelong_moe,finetune,l2] [--data_dir ./data] '
  "[--report_only [--backfill_analysis]]": Run(
    replace=(*DEMO_DIR, ("./data", "@DATA@")),
    append=TINY_LIFELONG,
    files=LIFELONG_FILES,
    check=_three_methods_complete,
  ),
  # launchers: their --dry_run (what they would start; the real starts need a cluster)
  "python launch/local.py --num_processes=2 --devices_per_process=4 -- train <gin args>": Run(
    replace=((" -- ", " --dry_run -- "), ("<gin args>", "--gin_file=models/tiny.gin")),
    output=("# 2 processes x 4 CPU devices", "--process_index=1"),
  ),
  "python launch/tpu_pod.py --tpu=NAME --zone=ZONE --accelerator_type=v5p-256 -- train "
  "<gin args>": Run(
    replace=((" -- ", " --dry_run -- "), ("<gin args>", "--gin_file=models/tiny.gin")),
    output=("gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all",),
  ),
  "sbatch launch/slurm_gpu.sbatch train <gin args>": Run(
    replace=(
      ("sbatch ", "bash "),
      (" train ", " --dry_run train "),
      ("<gin args>", "--gin_file=models/tiny.gin"),
    ),
    output=("srun --nodes=4 --ntasks=4",),
  ),
  "python launch/tpu_pod.py --tpu=glam-v5p --zone=us-east5-a --accelerator_type=v5p-256 -- "
  "train --gin_file=models/glam_0.1b_64e.gin --gin_file=runs/pretrain.gin "
  '--gin.MODEL_DIR=\\"gs://my-bucket/glam_0.1b\\" --gin.MeshConfig.data=2 '
  "--gin.MeshConfig.expert=64": Run(
    replace=((" -- ", " --dry_run -- "),),
    output=(  # what launch/README.md shows
      "# 1 x v5p-256: 128 chips, 32 workers x 4 chips; every worker runs the same command, "
      "jax.distributed.initialize() assigns process ids 0..31",
      "gcloud compute tpus tpu-vm ssh glam-v5p --zone=us-east5-a --worker=all '--command=cd "
      "~/lifelong-moe-jax && LIFELONG_MOE_DISTRIBUTED=1 python3 -m lifelong_moe_jax.train "
      "--gin_file=models/glam_0.1b_64e.gin --gin_file=runs/pretrain.gin '\"'\"'--gin.MODEL_DIR="
      "\"gs://my-bucket/glam_0.1b\"'\"'\"' --gin.MeshConfig.data=2 --gin.MeshConfig.expert=64'",
    ),
  ),
  "python launch/tpu_pod.py --mode=xpk --cluster=my-gke --num_slices=2 "
  "--accelerator_type=v5p-256 --docker_image=gcr.io/my-project/lifelong-moe:latest "
  "--repo_dir=/app -- train ... --gin.MeshConfig.data=4 --gin.MeshConfig.expert=64 "
  "--gin.MeshConfig.dcn_data=2": Run(
    replace=((" -- ", " --dry_run -- "), (" ... ", " --gin_file=models/tiny.gin ")),
    output=(
      "# 2 x v5p-256: 256 chips, 64 workers x 4 chips",
      "xpk workload create --cluster=my-gke --workload=lifelong-moe --tpu-type=v5p-256 "
      "--num-slices=2 --docker-image=gcr.io/my-project/lifelong-moe:latest",
    ),
  ),
  "sbatch launch/slurm_gpu.sbatch train --gin_file=models/glam_1.7b_64e.gin "
  '--gin_file=runs/pretrain.gin --gin.MODEL_DIR=\\"/shared/glam_1.7b\\" '
  "--gin.MeshConfig.data=4 --gin.MeshConfig.expert=8 --gin.MeshConfig.dcn_data=4": Run(
    replace=(("sbatch ", "bash "), (" train ", " --dry_run train ")),
    output=(
      "# 4 nodes x 1 tasks (8 GPUs per node): 4 processes; jax.distributed.initialize() detects "
      "SLURM",
      "srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --gpus-per-task=8 --kill-on-bad-exit=1",
      "task 3: node 3 GPUs 0-7 SLURM_PROCID=3 SLURM_LOCALID=0",
    ),
  ),
  # --- run by other tests -----------------------------------------------------------------------
  "python launch/local.py --num_processes=2 --devices_per_process=4 -- train "
  "--gin_file=models/tiny.gin --gin_file=runs/pretrain.gin --gin.MODEL_DIR=\\\"/tmp/run2\\\" "
  "--gin.MIXTURE_OR_TASK_NAME=\\\"lifelong_all\\\" \"--gin.TASK_FEATURE_LENGTHS={'targets': 64}\" "
  "--gin.TRAIN_STEPS=100 --gin.BATCH_SIZE=8 --gin.MeshConfig.data=2 "
  "--gin.MeshConfig.expert=4": Elsewhere(
    "tests/test_multiprocess.py::test_two_processes_equal_one_process",
    (
      '"launch", "local.py"',
      "--num_processes=",
      "--devices_per_process=",
      '"train"',
      "--gin_file=models/tiny.gin",
      "--gin.MeshConfig.data=2",
      "--gin.MeshConfig.expert=4",
    ),
  ),
  "python -m lifelong_moe_jax.data.prepare --distributions "
  "wiki_en,code_py,dialog_en,fortunes_intl": Elsewhere(
    # in-process (the CLI's options are run above); skipped without the Debian packages
    "tests/test_data_prepare.py::test_optional_non_english_distribution_builds_when_installed",
    ('"fortunes_intl"', "prepare.prepare("),
  ),
  ".venv/bin/python benchmarks/moe_vs_dense.py": Elsewhere(
    "tests/test_benchmarks.py::test_moe_vs_dense_prints_a_ratio", ('"moe_vs_dense.py"',)
  ),
  "python benchmarks/distill_step.py --steps 3 --rounds 5 --teacher_train_capacity": Elsewhere(
    "tests/test_benchmarks.py::test_distill_step_prints_the_ratio_and_a_live_kl",
    ('"distill_step.py"', "--steps=", "--rounds=", "--teacher_train_capacity"),
  ),
  "python benchmarks/distill_step.py --steps 3 --rounds 5 --teacher_samples": Elsewhere(
    "tests/test_benchmarks.py::test_distill_step_prints_the_ratio_and_a_live_kl",
    ('"distill_step.py"', "--steps=", "--rounds=", "--teacher_samples"),
  ),
  ".venv/bin/python benchmarks/train_step.py": Elsewhere(
    "tests/test_benchmarks.py::test_train_step_prints_mesh_ratios", ('"train_step.py"',)
  ),
  "python benchmarks/moe_layer.py --configs e8,e64 --tokens 4096 --steps 2 --rounds 5": Elsewhere(
    "tests/test_benchmarks.py::test_moe_layer_benchmark_prints_ratios_and_memory",
    ('"moe_layer.py"', "--configs=e8,e64", "--tokens=", "--steps=", "--rounds="),
  ),
  "python benchmarks/moe_layer.py --configs e64_glam --tokens 4096 --steps 1 --rounds 3": Elsewhere(
    # e64_glam: GLaM-size expert weights (minutes on CPU); the script's code path is the same
    "tests/test_benchmarks.py::test_moe_layer_benchmark_prints_ratios_and_memory",
    ('"moe_layer.py"', "--configs=", "--tokens=", "--steps=", "--rounds="),
  ),
  "python benchmarks/moe_vs_dense.py --preset glam_small --dispatches einsum,sort --steps 3 "
  "--rounds 7": Elsewhere(
    "tests/test_benchmarks.py::test_moe_vs_dense_with_more_experts_and_dispatches",
    ('"moe_vs_dense.py"', "--dispatches=einsum,sort", "--steps=", "--rounds="),
  ),
  "python benchmarks/moe_vs_dense.py --num_experts 64 --dispatches einsum,sort --steps 3 "
  "--rounds 5": Elsewhere(
    "tests/test_benchmarks.py::test_moe_vs_dense_with_more_experts_and_dispatches",
    ('"moe_vs_dense.py"', "--num_experts=", "--dispatches=einsum,sort"),
  ),
  "python benchmarks/moe_vs_dense.py --dispatches einsum,sort,ragged --steps 3 "
  "--rounds 5": Elsewhere(
    "tests/test_benchmarks.py::test_moe_vs_dense_with_more_experts_and_dispatches",
    ('"moe_vs_dense.py"', "--dispatches=", "--steps=", "--rounds="),
  ),
  'python benchmarks/mfu.py --gin_param "ModelConfig.vocab_size = 8000" --gin_param '
  '"ModelConfig.num_layers = 2" --batch 4 --length 1024 --steps 1 --rounds 2': Elsewhere(
    "tests/test_benchmarks.py::test_mfu_reports_achieved_flops_on_cpu",
    ('"mfu.py"', "--gin_param=ModelConfig.", "--batch=", "--length=", "--steps=", "--rounds="),
  ),
  "python benchmarks/mfu.py": Elsewhere(
    "tests/test_benchmarks.py::test_mfu_reports_achieved_flops_on_cpu", ('"mfu.py"',)
  ),
  "python benchmarks/mfu.py --peak_tflops 989": Elsewhere(
    "tests/test_benchmarks.py::test_mfu_reports_achieved_flops_on_cpu", ('"mfu.py"',)
  ),
  "python benchmarks/router_init_step0.py --checkpoint "
  "runs/study/shared/phase_0_wiki_en/checkpoints/1500 --data_dir ./data_study --mixture "
  "lifelong_fortunes_intl --eval_tasks lifelong_wiki_en,lifelong_fortunes_intl,lifelong_dialog_en "
  "--eval_batch 8 --eval_batches 8 --mean_batches 4 --router_offsets 1,2,4,8": Elsewhere(
    # on a tiny run of its own: the study's checkpoint and data_study come from `make study`
    "tests/test_benchmarks.py::test_router_init_step0_prints_the_step0_table",
    (
      '"router_init_step0.py"',
      "--checkpoint=",
      "--data_dir=",
      "--mixture=",
      "--eval_tasks=",
      "--eval_batch=",
      "--eval_batches=",
      "--mean_batches=",
      "--router_offsets=",
    ),
  ),
  "python benchmarks/router_separability.py --checkpoint runs/study/shared/phase_0_wiki_en "
  "--data_dir ./data_study --tasks lifelong_wiki_en,lifelong_fortunes_intl,lifelong_dialog_en": (
    Elsewhere(
      # on a tiny run of its own: the study's checkpoint and data_study come from `make study`
      "tests/test_benchmarks.py::test_router_separability_prints_probe_rows",
      ('"router_separability.py"', "--checkpoint=", "--data_dir=", "--tasks="),
    )
  ),
  "python benchmarks/seed_spread.py --runs runs/seed0,runs/seed1,runs/seed2,runs/seed3,runs/seed4 "
  "--reference lifelong_moe_offset2_src --out runs/seed_spread": Elsewhere(
    # on two tiny lifelong runs (seeds 0 and 1) of its own: the study's replicates take an hour
    "tests/test_seed_replicates.py::test_seed_spread_cli_on_two_tiny_runs",
    ('"seed_spread.py"', "--runs=", "--reference=", "--out="),
  ),
  "python benchmarks/sample_languages.py --run runs/study/lifelong_moe_contrast2_src_ts_rts1 "
  "--data_dir ./data_study --calibrate wiki_en,fortunes_intl,dialog_en": (
    Elsewhere(
      # on hand-made rows: the study's run dir and data_study come from the study
      "tests/test_benchmarks.py::test_sample_languages_counts_the_characters_of_each_phases_rows",
      ('"sample_languages.py"', "--run=", "--data_dir=", "--calibrate="),
    )
  ),
  "python benchmarks/forgetting_attribution.py --checkpoint "
  "runs/study/lifelong_moe_offset2_src/phase_1_fortunes_intl --reference "
  "runs/study/shared/phase_0_wiki_en --data_dir ./data_study --tasks "
  "lifelong_wiki_en,lifelong_fortunes_intl,lifelong_dialog_en --png forgetting_attribution.png": (
    Elsewhere(
      # on tiny runs of its own: the study's checkpoints and data_study come from `make study`
      "tests/test_benchmarks.py::test_forgetting_attribution_restores_groups_back_to_the_reference",
      ('"forgetting_attribution.py"', "--checkpoint=", "--reference=", "--data_dir=", "--tasks="),
    )
  ),
  "python benchmarks/distillation_bound.py --fit runs/study/finetune/phase_2_dialog_en --teacher "
  "runs/study/lifelong_moe_offset2_src/phase_1_fortunes_intl --data_dir ./data_study --tasks "
  "lifelong_dialog_en --weights 1,0.3,0.1": Elsewhere(
    # on tiny runs of its own: the study's checkpoints and data_study come from `make study`
    "tests/test_benchmarks.py::test_distillation_bound_matches_the_evaluator_and_mixes_the_two_models",
    ('"distillation_bound.py"', "--fit=", "--teacher=", "--data_dir=", "--tasks=", "--weights="),
  ),
  # --- not run by the test suite ----------------------------------------------------------------
  "make demo": Excluded(
    "CI runs `make demo` after `make test` (about 15 min on 2 cores); the same CLI runs the same "
    "schedule file above, shrunk"
  ),
  "make test": Excluded("the test suite itself"),
  "make study": Excluded(
    "about 2 h on 2 cores and the fortunes-* Debian packages; not part of `make test` or CI "
    "(docs/study.md)"
  ),
  (
    "python -m lifelong_moe_jax.study --data_dir ./data_study --model_dir ./runs/study "
    "--gin_file=lifelong/study_sweep.gin --claims_method=lifelong_moe_offset2_src"
  ): Excluded(
    "the study's option sweep: about 35 min after `make study` (same CLI, same reason); its gin "
    "files parse and resolve in tests/test_study_config.py"
  ),
  (
    "python -m lifelong_moe_jax.study --data_dir ./data_study --model_dir ./runs/seed1 "
    '--gin_file=lifelong/study_sweep.gin --gin_bindings="LifelongSchedule.seed = 1" '
    "--methods=finetune,lifelong_moe_offset2_src,distill_only_ts_acc,"
    "lifelong_moe_contrast2_src_ts_acc,distill_only,lifelong_moe_offset2_src_ts_acc "
    "--claims_method=lifelong_moe_offset2_src"
  ): Excluded(
    "one replicate of the study's key methods: about 35 min on 2 quiet cores (same CLI as "
    "`make study`, same reason); the seed binding's effect on a run is tested on tiny runs in "
    "tests/test_seed_replicates.py"
  ),
  'pip install -e ".[corpora]"': Excluded(
    "package installation (network); `make setup` does it before the tests run"
  ),
  "apt-get install -y fortunes-de fortunes-ru fortunes-zh": Excluded(
    "system package installation (root, network)"
  ),
}


# ---------------------------------------------------------------------------------------- tests
def test_every_documented_command_is_registered():
  missing = [
    f"{', '.join(where)}: {command!r}"
    for command, where in documented_commands().items()
    if command not in REGISTRY
  ]
  assert not missing, (
    "Commands shown in the docs that no test runs:\n  "
    + "\n  ".join(missing)
    + "\nAdd each (exactly as written above) to REGISTRY in tests/test_doc_commands.py: Run(...) "
    "to run it in the chain, Elsewhere('tests/test_x.py::test_y', needles) when another test runs "
    "it, or Excluded('reason')."
  )


def test_registry_has_no_stale_entries():
  documented = documented_commands()
  stale = [command for command in REGISTRY if command not in documented]
  assert not stale, (
    "REGISTRY entries that no doc (README.md, launch/README.md, docs/*.md) shows any more; remove "
    "them or update them to the new text:\n  " + "\n  ".join(map(repr, stale))
  )


def _test_code(test_id: str) -> str:
  """Source of a test function, of the fixtures and module functions it reaches (by name,
  transitively) and of the module's constants."""
  path, name = test_id.split("::")
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    source = f.read()
  tree = ast.parse(source)
  functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
  assert name in functions, f"{test_id}: no such test"
  seen, todo = set(), [name]
  while todo:
    current = todo.pop()
    if current in seen:
      continue
    seen.add(current)
    node = functions[current]
    names = {a.arg for a in node.args.args}  # fixtures
    names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    todo += [n for n in names if n in functions and n not in seen]
  parts = [ast.get_source_segment(source, functions[n]) for n in sorted(seen)]
  parts += [
    ast.get_source_segment(source, n)
    for n in tree.body
    if isinstance(n, (ast.Assign, ast.AnnAssign))
  ]
  return "\n".join(parts)


@pytest.mark.parametrize(
  "command",
  [c for c, how in REGISTRY.items() if isinstance(how, Elsewhere)],
  ids=lambda c: REGISTRY[c].test.split("::")[1],
)
def test_elsewhere_tests_exist(command):
  how = REGISTRY[command]
  code = _test_code(how.test)
  absent = [needle for needle in how.needles if needle not in code]
  assert not absent, f"{how.test} does not run {command!r}: its code lacks {absent}"


def _words(command: str, how: Run, tmp: str, data_dir: str) -> list[str]:
  """The argv of a documented command as this chain runs it."""
  text = command
  for old, new in how.replace:
    assert old in text, (old, command)
    text = text.replace(old, new, 1)
  words, depth = [], 0
  for word in shlex.split(text):  # "[--a [--b]]" -> "--a --b"; "--x=['y']" stays
    depth += len(word) - len(word.lstrip("["))
    word = word.lstrip("[")
    closed = min(depth, len(word) - len(word.rstrip("]")))
    if closed:
      word = word[:-closed]
      depth -= closed
    words.append(word)
  assert depth == 0, f"unbalanced [...] in {command!r}"
  words += how.append
  words = [w.replace("@TMP@", tmp).replace("@DATA@", data_dir) for w in words]
  if words[0] in ("python", "python3", ".venv/bin/python"):
    words[0] = sys.executable
  return words


def _env(data_dir: str) -> dict[str, str]:
  env = cli_env(data_dir)
  for key in [k for k in env if k.startswith("SLURM_")]:
    del env[key]  # the SLURM dry run plans for its own #SBATCH sizes
  return env


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("doc_commands"))


def _short(command: str) -> str:
  """``python -m lifelong_moe_jax.train ...`` -> ``train``; ``python launch/local.py ...`` ->
  ``local``."""
  words = command.split()
  if words[1] == "-m":
    return words[2].rsplit(".", 1)[-1]
  return os.path.splitext(os.path.basename(words[1]))[0]


RUNS = [c for c, how in REGISTRY.items() if isinstance(how, Run)]


@pytest.mark.parametrize("command", RUNS, ids=[f"{i:02d}-{_short(c)}" for i, c in enumerate(RUNS)])
def test_documented_command_runs(command, chain_dir, prepared_data_dir):
  """Runs in registry order: each command on what the earlier ones wrote into ``chain_dir``."""
  how = REGISTRY[command]
  words = _words(command, how, chain_dir, prepared_data_dir)
  start = time.time()
  proc = subprocess.run(
    words,
    cwd=REPO,
    env=_env(prepared_data_dir),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"{shlex.join(words)}\nexit {proc.returncode}\n{log[-6000:]}"
  for line in how.output:
    assert line in log, f"{shlex.join(words)}\ndid not print {line!r}:\n{log[-4000:]}"
  for pattern in how.files:
    paths = glob.glob(os.path.join(chain_dir, pattern))
    assert paths, f"{shlex.join(words)}\ndid not write {pattern}:\n{log[-4000:]}"
    for path in paths:
      assert os.path.getmtime(path) >= start - 1, f"{path} is older than the command"
      if os.path.isfile(path):
        assert os.path.getsize(path) > 0, path
  if how.check:
    how.check(chain_dir)
