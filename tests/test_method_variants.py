"""Method variants (``RunnerConfig.method_variants``): a registered method with its own
``MethodOptions`` values, sharing the first phase with the others, refused on a changed definition."""

import json
import os

import gin
import pytest

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong import runner as runner_lib
import tasks  # noqa: F401  (registers the seqio tasks)

TWO_PHASES = (
  'LifelongSchedule.phases = ['
  '{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 3}, '
  '{"name": "code_py", "mixture": "lifelong_code_py", "steps": 3, "add_experts": 2}]'
)


def test_variant_applies_its_overrides_to_the_run_options():
  variant = methods_lib.method_variant(
    "lm_test_dw", {"base": "lifelong_moe", "distill_weight": 0.3, "router_init": "copy_offset"}
  )
  base = methods_lib.get_method("lifelong_moe")
  assert (variant.expand, variant.freeze_old_experts, variant.distill) == (True, True, True)
  run = methods_lib.MethodOptions(distill_weight=1.0, l2_weight=0.5)
  opts = variant.options(run)
  assert (opts.distill_weight, opts.router_init, opts.l2_weight) == (0.3, "copy_offset", 0.5)
  assert base.options(run) is run
  spec = variant.to_dict()
  assert spec["option_overrides"] == {"distill_weight": 0.3, "router_init": "copy_offset"}
  assert "distill_weight=0.3" in spec["description"]
  # A variant of a variant keeps the first variant's overrides under its own.
  deeper = methods_lib.method_variant("lm_test_dw2", {"base": "lm_test_dw", "distill_weight": 0.1})
  assert deeper.options(run).distill_weight == 0.1
  assert deeper.options(run).router_init == "copy_offset"


@pytest.mark.parametrize(
  "name, spec, match",
  [
    ("ok_name", {"distill_weight": 0.3}, "needs a 'base'"),
    ("ok_name", {"base": "nope"}, "Unknown lifelong method"),
    ("bad name", {"base": "lifelong_moe"}, "letters, digits"),
    ("finetune", {"base": "lifelong_moe"}, "built-in method"),
    ("ok_name", {"base": "lifelong_moe", "distil_weight": 0.3}, "unknown MethodOptions"),
    ("ok_name", {"base": "lifelong_moe", "router_init": "sideways"}, "router_init"),
    ("ok_name", {"base": "lifelong_moe", "distill_weight": -1.0}, "distill_weight"),
  ],
)
def test_bad_variants_are_refused(name, spec, match):
  with pytest.raises(methods_lib.MethodError, match=match):
    methods_lib.method_variant(name, spec)
  assert "ok_name" not in methods_lib.METHODS


def _runner(model_dir, data_dir, methods, variants):
  gin.clear_config()
  gin_utils.parse_gin(
    ["lifelong/tiny_test.gin"],
    [
      f"MODEL_DIR = '{model_dir}'",
      TWO_PHASES,
      "LifelongSchedule.eval_max_batches = 1",
      f"RunnerConfig.method_variants = {variants!r}",
    ],
    finalize=False,
  )
  try:
    return runner_lib.LifelongRunner(methods=methods, data_dir=data_dir)
  finally:
    gin.clear_config()


def test_gin_variant_trains_its_own_phases_on_the_shared_first_phase(
  tmp_path, tmp_path_factory, prepared_data_dir
):
  model_dir = str(tmp_path / "run")
  variants = {"lm_w0": {"base": "lifelong_moe", "distill_weight": 0.0, "phase_warmup_steps": 2}}
  runner = _runner(model_dir, prepared_data_dir, ["lifelong_moe", "lm_w0"], variants)
  assert runner.phase_dir("lm_w0", 0) == runner.phase_dir("lifelong_moe", 0)
  assert runner.phase_dir("lm_w0", 1) == os.path.join(runner.model_dir, "lm_w0", "phase_1_code_py")
  assert runner.layout.options_for("lm_w0").distill_weight == 0.0
  assert runner.layout.options_for("lifelong_moe").distill_weight == 1.0
  assert (
    runner.config_for("lm_w0", 1).num_experts == runner.config_for("lifelong_moe", 1).num_experts
  )
  assert runner.optimizer_for("lm_w0") is not runner.optimizer_for("lifelong_moe")
  report = runner.run()
  ours, base = report["methods"]["lm_w0"], report["methods"]["lifelong_moe"]
  assert ours["complete"] and base["complete"]
  assert ours["phases"][0]["eval"] == base["phases"][0]["eval"]  # one shared phase A
  assert ours["phases"][1]["eval"] != base["phases"][1]["eval"]  # no distillation, other LR
  with open(os.path.join(runner.phase_dir("lm_w0", 1), phase_results.RESULT_FILE)) as f:
    recorded = json.load(f)["options"]
  assert recorded["distill_weight"] == 0.0 and recorded["phase_warmup_steps"] == 2
  # Re-defining the variant after it trained is refused, naming the changed option.
  changed = {"lm_w0": {"base": "lifelong_moe", "distill_weight": 0.5, "phase_warmup_steps": 2}}
  runner = _runner(model_dir, prepared_data_dir, ["lm_w0"], changed)
  with pytest.raises(runner_lib.LifelongError, match=r"distill_weight=0.0; now distill_weight=0.5"):
    runner.run()


@pytest.mark.parametrize("capacity, want", [("eval", 2.0), ("train", 1.25)])
def test_teacher_capacity_option_sets_the_teachers_capacity(capacity, want):
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong import distill  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong.schedule import LifelongSchedule  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel

  base = ModelConfig(
    vocab_size=64,
    embed_dim=16,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_experts=2,
    train_capacity_factor=1.25,
    eval_capacity_factor=2.0,
    max_length=16,
  )
  schedule = LifelongSchedule(
    phases=[
      {"name": "a", "mixture": "lifelong_wiki_en", "steps": 2},
      {"name": "b", "mixture": "lifelong_code_py", "steps": 2, "add_experts": 2},
    ]
  )
  setup = methods_lib.PhaseSetup(
    schedule=schedule,
    index=1,
    options=methods_lib.MethodOptions(teacher_capacity=capacity),
    base_config=base,
    partitioner=partitioning.Partitioner(
      partitioning.create_mesh(partitioning.MeshConfig(-1, 1, 1))
    ),
    data_dir=None,
    phase_dir="/unused",
    previous_phase_dir="/unused",
    previous_params=lambda: {},
    record=None,
  )
  regs = methods_lib.get_method("lifelong_moe").regularizers(setup)
  (teacher,) = [r for r in regs if isinstance(r, distill.Distillation)]
  assert teacher.teacher_model.config.eval_capacity_factor == want
  assert teacher.teacher_model.config.num_experts == 2  # the previous phase's model
  with pytest.raises(methods_lib.MethodError, match="teacher_capacity must be"):
    methods_lib.MethodOptions(teacher_capacity="both")


def test_variant_recipe_flags_replay_is_lifelong_moe_with_old_data():
  """A variant may set recipe flags (``VARIANT_RECIPE_FLAGS``): lifelong_moe that also replays."""
  from lifelong_moe_jax.lifelong.schedule import LifelongSchedule  # pylint: disable=import-outside-toplevel

  variant = methods_lib.method_variant(
    "lm_test_replay", {"base": "lifelong_moe", "replay": True, "distill_weight": 0.3}
  )
  flags = (variant.expand, variant.freeze_old_experts, variant.distill, variant.replay)
  assert flags == (True, True, True, True)
  assert variant.option_overrides == (("distill_weight", 0.3),)
  assert variant.to_dict()["base"] == "lifelong_moe"
  assert methods_lib.get_method("lifelong_moe").to_dict()["base"] is None
  assert "replay=True" in variant.description
  deeper = methods_lib.method_variant("lm_test_replay2", {"base": "lm_test_replay"})
  assert deeper.replay and deeper.base == "lifelong_moe"
  schedule = LifelongSchedule(
    phases=[
      {"name": "a", "mixture": "lifelong_wiki_en", "steps": 2},
      {"name": "b", "mixture": "lifelong_code_py", "steps": 2, "add_experts": 2},
    ]
  )
  opts = variant.options(methods_lib.MethodOptions())
  assert variant.mixture(schedule, 0, opts) == "lifelong_wiki_en"
  assert variant.mixture(schedule, 1, opts) == methods_lib.method_mixtures.register_replay_mixture(
    "lifelong_code_py", ["lifelong_wiki_en"], opts.replay_fraction
  )
  assert variant.mixture(schedule, 1, opts) != "lifelong_code_py"


@pytest.mark.parametrize(
  "spec, match",
  [
    ({"base": "lifelong_moe", "replay": "yes"}, "replay must be true or false"),
    ({"base": "lifelong_moe", "expand": False}, "freezing old experts without adding"),
    ({"base": "multitask", "replay": True}, "joint training already sees all data"),
    ({"base": "lifelong_moe", "joint": True}, "unknown MethodOptions"),
  ],
)
def test_bad_recipe_flags_are_refused(spec, match):
  with pytest.raises(methods_lib.MethodError, match=match):
    methods_lib.method_variant("ok_flags", spec)
  assert "ok_flags" not in methods_lib.METHODS


def test_a_finished_phase_on_other_data_is_refused(tmp_path, prepared_data_dir):
  """A variant name reused with replay toggled: its finished phase was trained on another mixture,
  so resuming refuses it (naming both mixtures) instead of reporting it as the new recipe."""
  from lifelong_moe_jax.lifelong import phase_run  # pylint: disable=import-outside-toplevel

  model_dir = str(tmp_path / "run")
  variants = {"lm_rp": {"base": "lifelong_moe", "replay": True}}
  runner = _runner(model_dir, prepared_data_dir, ["lm_rp"], variants)
  layout = runner.layout
  replay_mixture = layout.mixture_for("lm_rp", 1)
  path = layout.result_path("lm_rp", 1)
  os.makedirs(os.path.dirname(path))
  result = {"options": layout.options_for("lm_rp").to_dict(), "trained_on": replay_mixture}
  with open(path, "w") as f:
    json.dump(result, f)
  assert phase_run.completed_result(layout, "lm_rp", 1)["trained_on"] == replay_mixture
  runner = _runner(model_dir, prepared_data_dir, ["lm_rp"], {"lm_rp": {"base": "lifelong_moe"}})
  with pytest.raises(
    runner_lib.LifelongError, match="trained on 'lifelong_replay_.*lifelong_code_py"
  ):
    phase_run.completed_result(runner.layout, "lm_rp", 1)
