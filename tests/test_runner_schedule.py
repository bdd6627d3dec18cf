"""Schedule validation and the shipped schedule files (gin/lifelong/*.gin) parse and validate."""

import gin
import pytest
import seqio

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import runner as runner_lib
from lifelong_moe_jax.lifelong.phase_callbacks import FewshotEval
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule, PhaseSpec, ScheduleError
from lifelong_moe_jax.models.config import ModelConfig


def _parse(name, *bindings):
  gin.clear_config()
  gin_utils.parse_gin([name], ["MODEL_DIR = '/tmp/unused'", *bindings], finalize=False)


def test_schedule_steps_and_experts():
  s = LifelongSchedule(
    phases=[
      {"name": "a", "mixture": "x", "steps": 10},
      {"name": "b", "mixture": "y", "steps": 5, "add_experts": 2},
      PhaseSpec("c", "z", 7, 4),
    ]
  )
  assert s.names == ("a", "b", "c") and s.total_steps == 22
  assert [s.start_step(i) for i in range(3)] == [0, 10, 15]
  assert [s.end_step(i) for i in range(3)] == [10, 15, 22]
  assert s.expert_counts(4) == [4, 6, 10]
  s.validate_experts(4, expert_axis_size=2)
  with pytest.raises(ScheduleError, match="multiple of 4"):
    s.validate_experts(4, expert_axis_size=4)


@pytest.mark.parametrize(
  "phases, match",
  [
    ([], "empty"),
    ([{"name": "a", "mixture": "x", "steps": 0}], "steps must be positive"),
    (
      [{"name": "a", "mixture": "x", "steps": 1}, {"name": "a", "mixture": "y", "steps": 1}],
      "duplicate",
    ),
    ([{"name": "a", "mixture": "x", "steps": 1, "add_experts": 1}], "first phase"),
    ([{"name": "a", "mixture": "x", "steps": 1, "experts": 1}], "unknown keys"),
    ([{"name": "a", "steps": 1}], "missing"),
    ([{"name": "a b", "mixture": "x", "steps": 1}], "letters"),
  ],
)
def test_invalid_schedules(phases, match):
  with pytest.raises(ScheduleError, match=match):
    LifelongSchedule(phases=phases)


def test_paper_abc_parses_and_validates():
  _parse("lifelong/paper_abc.gin")
  try:
    schedule = LifelongSchedule()
    config = ModelConfig()
    tfds = gin.query_parameter("RunnerConfig.tfds_distributions")
    mixtures = gin.query_parameter("RunnerConfig.mixtures")
    fewshot = FewshotEval()
  finally:
    gin.clear_config()
  assert schedule.names == ("A_web_en", "B_non_english", "C_forum")
  assert config.num_experts == 32 and config.embed_dim == 768  # GLaM 0.1B, 32 -> 48 -> 64
  assert schedule.expert_counts(config.num_experts) == [32, 48, 64]
  schedule.validate_experts(config.num_experts, expert_axis_size=16)
  assert len(schedule.methods) == 11 and schedule.total_steps == 300000
  assert {"multitask", "multitask_final"} <= set(schedule.methods)
  runner_lib.register_distributions(tfds, mixtures)  # registration only: nothing is read
  assert "lifelong_phase_b" in seqio.MixtureRegistry.names()
  assert {"lifelong_c4_en", "lifelong_reddit"} <= set(seqio.TaskRegistry.names())
  # phase A: web pages and Wikipedia at 81:19
  assert schedule.phases[0].mixture == "lifelong_phase_a"
  phase_a = seqio.get_mixture_or_task("lifelong_phase_a")
  assert {t.name: phase_a.get_rate(t) for t in phase_a.tasks} == {
    "lifelong_c4_en": 81.0,
    "lifelong_wikipedia_en": 19.0,
  }
  # few-shot on the whole GLaM suite after every phase
  from tasks import glam_suite  # pylint: disable=import-outside-toplevel

  assert fewshot.enabled and list(fewshot.task_names) == list(glam_suite.SUITE)
  fewshot.callback()  # every name is a registered few-shot task (nothing is read)


def test_demo_schedule_parses():
  _parse("lifelong/demo_cpu.gin")
  try:
    schedule = LifelongSchedule()
    config = ModelConfig()
  finally:
    gin.clear_config()
  assert [p.mixture for p in schedule.phases] == [
    "lifelong_wiki_en",
    "lifelong_code_py",
    "lifelong_dialog_en",
  ]
  assert schedule.methods == ("lifelong_moe", "finetune")
  assert schedule.expert_counts(config.num_experts) == [4, 6, 8]


def test_demo_config_locks_before_the_runner_is_built(tmp_path):
  """In a fresh process, in lifelong_moe_jax.demo's order: the demo gin is parsed and locked, then
  the runner's few-shot callback is built; every gin configurable it needs must already be
  registered (importing one after the lock is an error)."""
  import os
  import subprocess
  import sys

  code = (
    "from lifelong_moe_jax import gin_utils\n"
    "import tasks\n"
    "from lifelong_moe_jax.lifelong import runner\n"
    "gin_utils.parse_gin(['lifelong/demo_cpu.gin'], [\"MODEL_DIR = 'unused'\"])\n"
    "fewshot = runner.FewshotEval()\n"
    "assert fewshot.enabled and fewshot.max_examples == 200, fewshot\n"
    "fewshot.callback()\n"
    "print('ok')\n"
  )
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    timeout=300,
  )
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_unknown_fewshot_task_is_refused_before_training():
  with pytest.raises(ScheduleError, match="fewshot_nope.*Registered"):
    FewshotEval(enabled=True, task_names=["fewshot_nope"]).callback()
