"""The study's gin files (gin/lifelong/study_cpu.gin, study_sweep.gin) parse, and every method they
name (built-in or variant) resolves with valid options; the default lifelong_moe options are the
variant the study chose them from."""

import gin

from lifelong_moe_jax import gin_utils
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong.runner import RunnerConfig
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule
import tasks  # noqa: F401  (registers the seqio tasks)


def _methods(*files):
  gin.clear_config()
  gin_utils.parse_gin(list(files), ["MODEL_DIR = '/tmp/unused'"], finalize=False)
  try:
    schedule, config = LifelongSchedule(), RunnerConfig()
    run_options = methods_lib.MethodOptions()
  finally:
    gin.clear_config()
  for name, spec in config.method_variants.items():
    methods_lib.method_variant(name, spec)
  return schedule, {m: methods_lib.get_method(m).options(run_options) for m in schedule.methods}


def test_study_and_sweep_configs_resolve():
  schedule, study = _methods("lifelong/study_cpu.gin")
  assert schedule.names == ("wiki_en", "fortunes_intl", "dialog_en")
  required = {"lifelong_moe", "finetune", "expand_only", "expand_freeze", "distill_only", "l2"}
  required |= {"ewc", "multitask", "multitask_final", "dense_finetune"}
  assert required <= set(study)
  assert study["lifelong_moe_dw0.3"].distill_weight == 0.3
  assert study["lifelong_moe_dw0.1"].distill_weight == 0.1
  # The run's options pin the settings before the study; the chosen default is a variant.
  assert study["lifelong_moe"].router_init == "copy"
  defaults = methods_lib.MethodOptions()
  chosen = study["lifelong_moe_offset2_src"]
  for field in ("router_init", "router_offset", "new_slice_opt_state"):
    assert getattr(chosen, field) == getattr(defaults, field), field
  _, sweep = _methods("lifelong/study_cpu.gin", "lifelong/study_sweep.gin")
  assert set(study) < set(sweep)
  assert sweep["lifelong_moe_offset2_all"].balance_new_experts_only is True
  assert sweep["lifelong_moe_offset2_all"].router_distill_weight == 1.0


def test_sweep_variants_of_the_attribution_and_penalty_studies():
  """The variants docs/study.md reports on resolve to the recipes and options it describes."""
  _, sweep = _methods("lifelong/study_cpu.gin", "lifelong/study_sweep.gin")
  assert sweep["lifelong_moe_offset2_src_fs"].freeze_shared is True
  assert sweep["lifelong_moe_offset2_src_fs_dw0"].distill_weight == 0.0
  assert sweep["lifelong_moe_contrast2_src_fs"].router_init == "copy_contrast"
  nofreeze = methods_lib.get_method("lifelong_moe_offset2_src_nofreeze")
  assert (nofreeze.expand, nofreeze.freeze_old_experts, nofreeze.distill) == (True, False, True)
  assert sweep["ewc_w1e4"].ewc_weight == 1e4 and sweep["ewc_w1e6"].ewc_weight == 1e6
  assert methods_lib.get_method("ewc_w1e6").penalty == "ewc"
  assert sweep["l2_w0.1"].l2_weight == 0.1
  combined = methods_lib.get_method("lifelong_moe_offset2_src_l2w0.1")
  assert (combined.expand, combined.freeze_old_experts, combined.distill) == (True, True, True)
  assert combined.penalty == "l2" and sweep["lifelong_moe_offset2_src_l2w0.1"].l2_weight == 0.1


def test_ewc_rows_and_teacher_sample_variants():
  """`ewc` keeps the study's settings from before the per-token Fisher; `ewc_tok` has today's
  defaults; the teacher-sample variants are the default recipe with distill_inputs changed."""
  _, study = _methods("lifelong/study_cpu.gin")
  defaults = methods_lib.MethodOptions()
  assert (study["ewc"].fisher_estimator, study["ewc"].ewc_weight) == ("batch_gradient", 100.0)
  assert (study["ewc_tok"].fisher_estimator, study["ewc_tok"].ewc_weight) == (
    defaults.fisher_estimator,
    defaults.ewc_weight,
  )
  _, sweep = _methods("lifelong/study_cpu.gin", "lifelong/study_sweep.gin")
  chosen = sweep["lifelong_moe_offset2_src"]
  for name, inputs in (
    ("lifelong_moe_offset2_src_ts", "teacher_samples"),
    ("lifelong_moe_offset2_src_tsboth", "both"),
  ):
    assert sweep[name].distill_inputs == inputs
    for field in ("router_init", "router_offset", "new_slice_opt_state", "distill_weight"):
      assert getattr(sweep[name], field) == getattr(chosen, field), (name, field)
  assert sweep["distill_only_ts"].distill_inputs == "teacher_samples"
  assert methods_lib.get_method("distill_only_ts").expand is False
  assert methods_lib.get_method("lifelong_moe_offset2_src_ts_nofreeze").freeze_old_experts is False
  assert sweep["lifelong_moe_offset2_src_ts_w3"].distill_weight == 3.0
  assert sweep["lifelong_moe_offset2_src_ts_r1k"].teacher_sample_rows == 1024
  assert sweep["distill_only_ts_w3"].distill_weight == 3.0
  for name, offset in (
    ("lifelong_moe_contrast2_src_ts", 2.0),
    ("lifelong_moe_contrast4_src_ts", 4.0),
  ):
    assert (sweep[name].router_init, sweep[name].router_offset) == ("copy_contrast", offset)
    assert sweep[name].distill_inputs == "teacher_samples"
  assert sweep["lifelong_moe_offset2_src_ts_b4"].teacher_sample_batch == 4
  for name, init, weight in (
    ("lifelong_moe_offset2_src_ts_rts1", "copy_offset", 1.0),
    ("lifelong_moe_contrast2_src_ts_rts1", "copy_contrast", 1.0),
    ("lifelong_moe_contrast2_src_ts_rts0.1", "copy_contrast", 0.1),
  ):
    options = sweep[name]
    assert (options.router_init, options.router_rehearsal_weight) == (init, weight)
    assert options.router_rehearsal_inputs == options.distill_inputs == "teacher_samples"
    assert options.teacher_sample_pool == "latest"
  assert sweep["lifelong_moe_offset2_src_ts_acc"].teacher_sample_pool == "accumulated"
  acc = sweep["lifelong_moe_contrast2_src_ts_rts1_acc"]
  assert (acc.teacher_sample_pool, acc.router_rehearsal_inputs) == (
    "accumulated",
    "teacher_samples",
  )
  assert (acc.router_init, acc.router_rehearsal_weight) == ("copy_contrast", 1.0)
  for name, offset, weight in (
    ("lifelong_moe_contrast2_src_ts_rts3_acc", 2.0, 3.0),
    ("lifelong_moe_contrast4_src_ts_rts1_acc", 4.0, 1.0),
  ):
    options = sweep[name]
    assert (options.router_init, options.router_offset) == ("copy_contrast", offset), name
    assert options.router_rehearsal_weight == weight, name
    assert options.teacher_sample_pool == "accumulated", name
  balnew = sweep["lifelong_moe_contrast2_src_ts_rts1_acc_balnew"]
  assert balnew.balance_new_experts_only is True and balnew.teacher_sample_pool == "accumulated"
  assert balnew.router_rehearsal_inputs == "teacher_samples"
  plain_acc = sweep["lifelong_moe_contrast2_src_ts_acc"]
  assert (plain_acc.router_init, plain_acc.teacher_sample_pool) == ("copy_contrast", "accumulated")
  assert plain_acc.router_rehearsal_weight == 0.0
  lwf_acc = sweep["distill_only_ts_acc"]
  assert (lwf_acc.distill_inputs, lwf_acc.teacher_sample_pool) == ("teacher_samples", "accumulated")
  assert methods_lib.get_method("distill_only_ts_acc").expand is False
