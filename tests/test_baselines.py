"""The lifelong methods: registry, validation, data mixtures, per-phase plans, and a short 2-phase
run of the baselines with their own code paths (L2, EWC, replay, multitask, dense fine-tuning)."""

import dataclasses
import os

import gin
import pytest
import seqio

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import ewc_fisher
from lifelong_moe_jax.lifelong import method_mixtures
from lifelong_moe_jax.lifelong import methods as baselines
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import summaries
import tasks  # noqa: F401  (registers the seqio tasks)
from tiny_runner import tiny_runner

ALL = [
  "lifelong_moe",
  "finetune",
  "expand_only",
  "expand_freeze",
  "distill_only",
  "l2",
  "ewc",
  "replay",
  "multitask",
  "dense_finetune",
]
TWO_PHASES = (
  'LifelongSchedule.phases = ['
  '{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 4}, '
  '{"name": "code_py", "mixture": "lifelong_code_py", "steps": 4, "add_experts": 2}]'
)


def test_registry_has_every_method():
  assert set(ALL) <= set(baselines.METHODS)
  flags = {n: baselines.get_method(n) for n in ALL}
  assert flags["lifelong_moe"].expand and flags["lifelong_moe"].freeze_old_experts
  assert flags["lifelong_moe"].distill and not flags["finetune"].expand
  assert flags["expand_freeze"].freeze_old_experts and not flags["expand_freeze"].distill
  assert flags["distill_only"].distill and not flags["distill_only"].expand
  assert flags["l2"].penalty == "l2" and flags["ewc"].penalty == "ewc"
  assert flags["replay"].replay and flags["multitask"].joint and flags["dense_finetune"].dense
  with pytest.raises(baselines.MethodError, match="Unknown lifelong method"):
    baselines.get_method("nope")


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"dense": True, "expand": True}, "dense"),
    ({"freeze_old_experts": True}, "expand=True"),
    ({"penalty": "ewc", "expand": True}, "EWC"),
    ({"joint": True, "replay": True}, "joint"),
    ({"penalty": "l1"}, "penalty"),
  ],
)
def test_inconsistent_methods_are_rejected(kwargs, match):
  with pytest.raises(baselines.MethodError, match=match):
    baselines.Method("bad", "", **kwargs)


def test_method_options_validation():
  with pytest.raises(baselines.MethodError, match="replay_fraction"):
    baselines.MethodOptions(replay_fraction=1.0)
  with pytest.raises(baselines.MethodError, match="expert_init"):
    baselines.MethodOptions(expert_init="zeros")


def test_dense_model_is_flop_matched():
  gin.clear_config()
  gin.parse_config_file(os.path.join(gin_utils.REPO_GIN_DIR, "models", "demo.gin"))
  demo = ModelConfig()
  gin.clear_config()
  assert baselines.dense_mlp_dim(demo) == 768  # as gin/models/demo_dense.gin
  dense = baselines.dense_config(demo)
  assert dense.num_experts == 0 and dense.mlp_dim == 768 and not dense.is_moe
  assert baselines.dense_config(demo, 1024).mlp_dim == 1024


def test_replay_and_joint_mixtures():
  name = method_mixtures.register_replay_mixture(
    "lifelong_dialog_en", ["lifelong_wiki_en", "lifelong_code_py"], 0.25
  )
  mixture = seqio.MixtureRegistry.get(name)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == pytest.approx(
    {"lifelong_dialog_en": 0.75, "lifelong_wiki_en": 0.125, "lifelong_code_py": 0.125}
  )
  assert method_mixtures.register_replay_mixture("lifelong_wiki_en", [], 0.25) == "lifelong_wiki_en"
  assert name == method_mixtures.register_replay_mixture(
    "lifelong_dialog_en", ["lifelong_wiki_en", "lifelong_code_py"], 0.25
  )  # deterministic
  joint = seqio.MixtureRegistry.get(
    method_mixtures.register_joint_mixture(["lifelong_wiki_en", "lifelong_all"])
  )
  rates = {t.name: joint.get_rate(t) for t in joint.tasks}
  assert rates == pytest.approx(
    {"lifelong_wiki_en": 0.5 + 0.5 / 3, "lifelong_code_py": 0.5 / 3, "lifelong_dialog_en": 0.5 / 3}
  )


def test_per_phase_plans(tmp_path, prepared_data_dir):
  runner = tiny_runner(str(tmp_path / "plan"), prepared_data_dir, ALL)
  experts = {m: [runner.config_for(m, i).num_experts for i in range(3)] for m in ALL}
  for m in ("lifelong_moe", "expand_only", "expand_freeze"):
    assert experts[m] == [2, 4, 6]
  for m in ("finetune", "distill_only", "l2", "ewc", "replay", "multitask"):
    assert experts[m] == [2, 2, 2]
  assert experts["dense_finetune"] == [0, 0, 0]
  assert runner.layout.mixture_for("finetune", 2) == "lifelong_dialog_en"
  assert runner.layout.mixture_for("replay", 0) == "lifelong_wiki_en"
  assert runner.layout.mixture_for("replay", 2).startswith("lifelong_replay_")
  joint = runner.layout.mixture_for("multitask", 0)
  assert joint.startswith("lifelong_joint_") and joint == runner.layout.mixture_for("multitask", 2)
  shared = [m for m in ALL if runner.layout.is_shared(m, 0)]
  assert sorted(shared) == sorted(set(ALL) - {"multitask", "dense_finetune"})
  assert not any(runner.layout.is_shared(m, 1) for m in ALL)
  assert runner.phase_dir("l2", 0) == runner.phase_dir("finetune", 0)
  assert runner.phase_dir("l2", 1) != runner.phase_dir("finetune", 1)


def test_schedule_errors_before_work(tmp_path, prepared_data_dir):
  with pytest.raises(ValueError, match="Unknown task or mixture"):
    tiny_runner(
      str(tmp_path / "x"),
      prepared_data_dir,
      ["finetune"],
      ['LifelongSchedule.phases = [{"name": "a", "mixture": "nope", "steps": 2}]'],
    )
  with pytest.raises(ValueError, match="first phase"):
    tiny_runner(
      str(tmp_path / "x"),
      prepared_data_dir,
      ["finetune"],
      [
        'LifelongSchedule.phases = [{"name": "a", "mixture": "lifelong_wiki_en", "steps": 2, '
        '"add_experts": 2}]'
      ],
    )
  with pytest.raises(ValueError, match="not divisible by the expert mesh axis"):
    tiny_runner(
      str(tmp_path / "x"),
      prepared_data_dir,
      ["lifelong_moe"],
      ["MeshConfig.expert = 2", TWO_PHASES.replace('"add_experts": 2', '"add_experts": 1')],
    )
  assert not os.path.exists(tmp_path / "x")


def test_baselines_run_two_phases(tmp_path, tmp_path_factory, prepared_data_dir):
  methods = ["l2", "ewc", "replay", "multitask", "dense_finetune"]
  model_dir = str(tmp_path / "baselines")
  cache = tmp_path_factory.getbasetemp() / "jax_cache"  # shared with tests/test_runner.py
  runner = tiny_runner(
    model_dir,
    prepared_data_dir,
    methods,
    [
      TWO_PHASES,
      "LifelongSchedule.eval_max_batches = 1",
      f"RunnerConfig.compilation_cache_dir = '{cache}'",
    ],
  )
  report = runner.run()
  for m in methods:
    assert report["methods"][m]["complete"], m
  assert report["methods"]["dense_finetune"]["experts_per_layer"] == [[], []]
  assert report["methods"]["dense_finetune"]["phases"][0]["num_experts"] == 0
  assert report["methods"]["multitask"]["phases"][0]["trained_on"].startswith("lifelong_joint_")
  assert report["methods"]["replay"]["phases"][1]["trained_on"].startswith("lifelong_replay_")
  assert os.path.isdir(os.path.join(runner.phase_dir("ewc", 1), ewc_fisher.FISHER_DIR))
  for m, key in (("l2", "reg/l2/distance"), ("ewc", "reg/ewc/distance")):
    records = summaries.read_jsonl(os.path.join(runner.phase_dir(m, 1), "train", "metrics.jsonl"))
    assert records and all(r[key] >= 0 for r in records) and records[-1][key] > 0, m
  first = {m: report["methods"][m]["phases"][0]["eval"] for m in ("l2", "ewc", "replay")}
  assert first["l2"] == first["ewc"] == first["replay"]  # the shared first phase
  assert dataclasses.asdict(runner.base_config)["num_experts"] == 2
