"""Distillation on teacher samples (lifelong/pseudo_rehearsal.py): the packed layout by hand and
against seqio's feature converter, the rows against the decoder's own samples, the loss against a
separate computation, and the method wiring in a two-phase run."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from lifelong_moe_jax import decoding
from lifelong_moe_jax.lifelong import distill
from lifelong_moe_jax.lifelong import method_options
from lifelong_moe_jax.lifelong import pseudo_rehearsal as pr
from lifelong_moe_jax.lifelong import router_rehearsal as rr
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models import router_probe
from lifelong_moe_jax.models.config import ModelConfig


def _config(**changes) -> ModelConfig:
  base = dict(
    vocab_size=64,
    embed_dim=16,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_experts=4,
    group_size=8,
    max_length=16,
    router_jitter=0.0,
    train_capacity_factor=2.0,
    eval_capacity_factor=2.0,
  )
  base.update(changes)
  return ModelConfig(**base)


def test_pack_sequences_by_hand():
  seqs = [np.array([5, 6, 1]), np.array([7, 1]), np.array([], np.int32), np.array([8, 9, 10, 1])]
  rows, used = pr.pack_sequences(seqs, num_rows=3, length=6)
  assert used == 4
  np.testing.assert_array_equal(
    rows["decoder_target_tokens"], [[5, 6, 1, 7, 1, 0], [8, 9, 10, 1, 0, 0], [0] * 6]
  )
  np.testing.assert_array_equal(
    rows["decoder_input_tokens"], [[0, 5, 6, 0, 7, 0], [0, 8, 9, 10, 0, 0], [0] * 6]
  )
  np.testing.assert_array_equal(
    rows["decoder_segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [0] * 6]
  )
  np.testing.assert_array_equal(
    rows["decoder_positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0], [0] * 6]
  )
  np.testing.assert_array_equal(rows["decoder_loss_weights"], rows["decoder_segment_ids"] > 0)
  # Full rows: the packer stops at the sequence that does not fit; long sequences are cut.
  rows, used = pr.pack_sequences([np.arange(2, 12), np.array([3, 1]), np.array([4, 1])], 1, 6)
  assert used == 1
  np.testing.assert_array_equal(rows["decoder_target_tokens"], [[2, 3, 4, 5, 6, 7]])


def test_packed_segments_match_seqios_decoder_feature_converter():
  rng = np.random.default_rng(0)
  seqs = [np.append(rng.integers(2, 50, size=n), 1) for n in rng.integers(1, 9, size=12)]
  rows, used = pr.pack_sequences(seqs, num_rows=8, length=12)
  assert used == len(seqs)
  ds = tf.data.Dataset.from_generator(
    lambda: ({"targets": s.astype(np.int32)} for s in seqs),
    output_signature={"targets": tf.TensorSpec([None], tf.int32)},
  )
  converted = seqio.DecoderFeatureConverter(pack=False)(ds, {"targets": 12})
  want = list(converted.as_numpy_iterator())
  found = 0
  for r in range(8):
    seg = rows["decoder_segment_ids"][r]
    for s in range(1, seg.max() + 1):
      cols = seg == s
      ref = want[found]
      n = int(cols.sum())
      for key in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"):
        np.testing.assert_array_equal(rows[key][r][cols], ref[key][:n], err_msg=key)
      assert not ref["decoder_loss_weights"][n:].any()
      found += 1
  assert found == len(seqs)


def test_sample_rows_are_the_decoders_samples_in_order():
  config = _config()
  model = lm.LanguageModel(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  key = jax.random.PRNGKey(3)
  rows, stats = pr.sample_rows(
    model, params, num_rows=4, length=16, rng=key, temperature=1.0, batch_size=3
  )
  again, _ = pr.sample_rows(
    model, params, num_rows=4, length=16, rng=key, temperature=1.0, batch_size=3
  )
  for k in pr.FEATURES:
    np.testing.assert_array_equal(rows[k], again[k])
  # Round 0's samples, drawn directly, fill the first segments in order.
  ref = decoding.generate(
    model,
    params,
    np.zeros((3, 0), np.int32),
    max_decode_len=15,
    rng=jax.random.fold_in(key, 0),
    temperature=1.0,
  )
  tokens, lengths = np.asarray(ref.tokens), np.asarray(ref.lengths)
  want = [tokens[i, : lengths[i]] for i in range(3) if lengths[i] > 0]
  got = []
  for r in range(4):
    seg = rows["decoder_segment_ids"][r]
    got += [rows["decoder_target_tokens"][r][seg == s] for s in range(1, seg.max() + 1)]
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)
  assert stats["rounds"] >= 2 and 0 < stats["fill"] <= 1
  assert stats["fill"] == pytest.approx(float(np.mean(rows["decoder_loss_weights"])))


def _rows(config, num=6, seed=1):
  rng = np.random.default_rng(seed)
  seqs = [np.append(rng.integers(2, config.vocab_size, size=n), 1) for n in rng.integers(2, 12, 20)]
  return pr.pack_sequences(seqs, num, config.max_length)[0]


class _Ctx:
  def __init__(self, model, params):
    self.model, self.params = model, params


@pytest.mark.parametrize("on_batch, size", [(False, 0), (True, 0), (False, 2)])
def test_loss_equals_a_separate_computation(on_batch, size):
  t_config, s_config = _config(), _config(num_experts=6)
  teacher, student = lm.LanguageModel(t_config), lm.LanguageModel(s_config)
  t_params = nn.unbox(teacher.init(jax.random.PRNGKey(1)))
  s_params = nn.unbox(student.init(jax.random.PRNGKey(2)))
  rows = _rows(t_config)
  reg = pr.TeacherSampleDistillation(
    teacher, t_params, rows, on_batch=on_batch, temperature=2.0, weight=0.7, batch_size=size
  )
  aux, axes = reg.init_state(_Ctx(student, s_params))
  assert set(aux) == {"teacher", "rows"} and set(axes["rows"]) == set(pr.FEATURES)
  batch = {k: v[:3] for k, v in _rows(t_config, seed=5).items()}
  s_logits = student.logits(s_params, batch)
  rng = jax.random.PRNGKey(9)
  term, metrics = reg(s_params, batch, s_logits, aux, rng)
  # The reference: the same rows picked by hand, both models run separately.
  pick = jax.random.randint(
    jax.random.split(rng)[0], (size or 3,), 0, rows["decoder_target_tokens"].shape[0]
  )
  pseudo = {k: jnp.asarray(v)[pick] for k, v in rows.items()}
  want_kl = distill.distillation_loss(
    student.logits(s_params, pseudo),
    teacher.logits(t_params, pseudo),
    lm.loss_weights_of(pseudo),
    2.0,
  )
  np.testing.assert_allclose(metrics["kl_samples"], want_kl, rtol=1e-5)
  want = 0.7 * want_kl
  if on_batch:
    batch_kl = distill.distillation_loss(
      s_logits, teacher.logits(t_params, batch), lm.loss_weights_of(batch), 2.0
    )
    np.testing.assert_allclose(metrics["kl"], batch_kl, rtol=1e-5)
    want = want + 0.7 * batch_kl
  else:
    assert "kl" not in metrics
  np.testing.assert_allclose(term, want, rtol=1e-5)


def _neg_log_mass(logits, lo, hi):
  """``-log sum_{lo <= e < hi} softmax(logits)_e`` in float64 numpy."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  return -np.log(p[..., lo:hi].sum(-1))


def test_router_rehearsal_on_sample_rows_equals_a_separate_computation():
  """router_rehearsal_inputs = "teacher_samples": the old half on the sample rows' real tokens
  (their router inputs in the same student pass), the new half on the batch's."""
  t_config, s_config = _config(), _config(num_experts=6)
  teacher, student = lm.LanguageModel(t_config), lm.LanguageModel(s_config)
  t_params = nn.unbox(teacher.init(jax.random.PRNGKey(1)))
  s_params = nn.unbox(student.init(jax.random.PRNGKey(2)))
  rows = _rows(t_config)
  rehearsal = rr.RouterRehearsal(
    s_config,
    4,
    nn.unbox(student.abstract_params()),
    student.params_logical_axes(),
    None,
    None,
    weight=0.3,
  )
  with pytest.raises(ValueError, match="no Gaussians"):
    rehearsal.init_state(None)
  reg = pr.TeacherSampleDistillation(
    teacher, t_params, rows, weight=0.7, batch_size=4, router_rehearsal=rehearsal
  )
  assert reg.uses_router_logits and reg.uses_router_inputs
  aux, _ = reg.init_state(_Ctx(student, s_params))
  batch = {k: v[:3] for k, v in _rows(t_config, seed=5).items()}
  with router_probe.capture_router(token_inputs=True):
    s_logits, inter, _ = student.apply(s_params, batch)
  rng = jax.random.PRNGKey(9)
  term, metrics = reg(s_params, batch, s_logits, aux, rng, intermediates=inter)
  # The reference: the same rows, both halves from the router logits of separate forward passes.
  pick_rng, model_rng = jax.random.split(rng)
  pick = jax.random.randint(pick_rng, (4,), 0, rows["decoder_target_tokens"].shape[0])
  pseudo = {k: jnp.asarray(v)[pick] for k, v in rows.items()}
  with router_probe.capture_router():
    _, pseudo_inter, _ = student.apply(s_params, pseudo, train=True, rng=model_rng)
  old_logits = router_probe.collect_router_stats(pseudo_inter, s_config)["router_logits"]
  new_logits = router_probe.collect_router_stats(inter, s_config)["router_logits"]
  old_mask = np.asarray(lm.token_mask_of(pseudo), np.float64).reshape(old_logits.shape[1:3])
  new_mask = np.asarray(lm.token_mask_of(batch), np.float64).reshape(new_logits.shape[1:3])
  assert 0 < old_mask.sum() < old_mask.size  # the rows have padding, which must not count
  want_old = np.mean(
    [(_neg_log_mass(old_logits[m], 0, 4) * old_mask).sum() / old_mask.sum() for m in range(2)]
  )
  want_new = np.mean(
    [(_neg_log_mass(new_logits[m], 4, 6) * new_mask).sum() / new_mask.sum() for m in range(2)]
  )
  np.testing.assert_allclose(metrics["router_rehearsal/old"], want_old, rtol=1e-4)
  np.testing.assert_allclose(metrics["router_rehearsal/new"], want_new, rtol=1e-4)
  np.testing.assert_allclose(
    term, 0.7 * metrics["kl_samples"] + 0.3 * (want_old + want_new), rtol=1e-4
  )
  # Without the batch's router inputs the term refuses to guess.
  with pytest.raises(ValueError, match="router inputs"):
    reg(s_params, batch, s_logits, aux, rng)


def test_student_equal_to_teacher_gets_zero_loss_and_gradient():
  config = _config()
  model = lm.LanguageModel(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(4)))
  reg = pr.TeacherSampleDistillation(model, params, _rows(config))
  aux, _ = reg.init_state(_Ctx(model, params))
  batch = {k: v[:2] for k, v in _rows(config, seed=7).items()}

  def term(p):
    return reg(p, batch, model.logits(p, batch), aux, jax.random.PRNGKey(0))[0]

  value, grads = jax.value_and_grad(term)(params)
  assert abs(float(value)) < 1e-5
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads)) < 1e-4
  # A different student gets a positive term and a gradient.
  other = nn.unbox(model.init(jax.random.PRNGKey(5)))
  value, grads = jax.value_and_grad(term)(other)
  assert float(value) > 1e-3
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads)) > 1e-4


def test_options_and_rows_are_validated():
  assert method_options.LEGACY_OPTION_VALUES["distill_inputs"] == "batch"
  with pytest.raises(method_options.MethodError, match="distill_inputs"):
    method_options.MethodOptions(distill_inputs="old_data")
  with pytest.raises(method_options.MethodError, match="teacher_sample_rows"):
    method_options.MethodOptions(teacher_sample_rows=0)
  with pytest.raises(method_options.MethodError, match="teacher_sample_batch"):
    method_options.MethodOptions(teacher_sample_batch=-1)
  with pytest.raises(method_options.MethodError, match="router_distill_weight"):
    method_options.MethodOptions(distill_inputs="teacher_samples", router_distill_weight=0.1)
  assert method_options.LEGACY_OPTION_VALUES["router_rehearsal_inputs"] == "gaussian"
  with pytest.raises(method_options.MethodError, match="router_rehearsal_inputs"):
    method_options.MethodOptions(router_rehearsal_inputs="replay")
  with pytest.raises(method_options.MethodError, match="does not draw"):
    method_options.MethodOptions(
      router_rehearsal_inputs="teacher_samples", router_rehearsal_weight=0.1
    )
  on_samples = method_options.MethodOptions(
    router_rehearsal_inputs="teacher_samples",
    router_rehearsal_weight=0.1,
    distill_inputs="teacher_samples",
  )
  from lifelong_moe_jax.lifelong import methods  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.lifelong import schedule  # pylint: disable=import-outside-toplevel

  sched = schedule.LifelongSchedule(
    phases=[
      {"name": "a", "mixture": "a", "steps": 1},
      {"name": "b", "mixture": "b", "steps": 1, "add_experts": 2},
    ]
  )
  methods.get_method("lifelong_moe").validate(sched, _config(), on_samples)
  with pytest.raises(method_options.MethodError, match="adds experts and distils"):
    methods.get_method("expand_only").validate(sched, _config(), on_samples)
  config = _config()
  model = lm.LanguageModel(config)
  rows = _rows(config)
  with pytest.raises(ValueError, match="lack feature"):
    pr.TeacherSampleDistillation(
      model, None, {"decoder_target_tokens": rows["decoder_target_tokens"]}
    )
  long_rows = {k: np.zeros((2, 32), np.int32) for k in pr.FEATURES}
  reg = pr.TeacherSampleDistillation(model, {}, long_rows)
  with pytest.raises(ValueError, match="max_length"):
    reg.init_state(_Ctx(model, {}))


def test_sample_pool_option_and_pooling():
  assert method_options.MethodOptions().teacher_sample_pool == "latest"
  assert method_options.LEGACY_OPTION_VALUES["teacher_sample_pool"] == "latest"
  with pytest.raises(method_options.MethodError, match="teacher_sample_pool must be one of"):
    method_options.MethodOptions(distill_inputs="teacher_samples", teacher_sample_pool="all")
  with pytest.raises(method_options.MethodError, match="does not draw"):
    method_options.MethodOptions(teacher_sample_pool="accumulated")
  method_options.MethodOptions(distill_inputs="both", teacher_sample_pool="accumulated")
  earlier = {k: np.full((2, 4), i, np.int32) for i, k in enumerate(pr.FEATURES)}
  new = {k: np.full((3, 4), 10 + i, np.int32) for i, k in enumerate(pr.FEATURES)}
  pooled = pr.pool_rows(earlier, new)
  for i, k in enumerate(pr.FEATURES):
    assert pooled[k].shape == (5, 4)
    assert pooled[k][:2].tolist() == [[i] * 4] * 2 and pooled[k][2:].tolist() == [[10 + i] * 4] * 3
  assert pr.pool_rows(None, new)["decoder_target_tokens"].shape == (3, 4)
  short = {k: np.zeros((2, 3), np.int32) for k in pr.FEATURES}
  with pytest.raises(method_options.MethodError, match="lengths \\[3, 4\\]"):
    pr.pool_rows(short, new)


def test_two_phase_run_saves_the_teacher_samples_and_trains_on_them(tmp_path, prepared_data_dir):
  from lifelong_moe_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax.training import summaries  # pylint: disable=import-outside-toplevel
  from tiny_runner import TWO_PHASES, tiny_runner  # pylint: disable=import-outside-toplevel

  runner = tiny_runner(
    str(tmp_path / "run"),
    prepared_data_dir,
    ["lifelong_moe"],
    [
      *TWO_PHASES,
      'MethodOptions.distill_inputs = "both"',
      "MethodOptions.teacher_sample_rows = 8",
      "MethodOptions.router_rehearsal_weight = 0.5",
      'MethodOptions.router_rehearsal_inputs = "teacher_samples"',
    ],
  )
  report = runner.run()
  assert report["methods"]["lifelong_moe"]["complete"]
  pdir = runner.phase_dir("lifelong_moe", 1)
  rows = pr.load_samples(pdir)
  length = runner.schedule.task_feature_lengths["targets"]
  assert rows["decoder_target_tokens"].shape == (8, length)
  # The rows are phase 0's final model's samples with the schedule's key, drawn again here.
  config0 = runner.config_for("lifelong_moe", 0)
  model0 = lm.LanguageModel(config0)
  partitioner = partitioning.Partitioner(
    partitioning.create_mesh(partitioning.MeshConfig(-1, 1, 1))
  )
  params0 = checkpoints.restore_model_params(
    runner.layout.final_step_dir("lifelong_moe", 0), model0, partitioner
  )
  with partitioner.context():
    want, _ = pr.sample_rows(
      model0,
      params0,
      num_rows=8,
      length=length,
      rng=jax.random.PRNGKey(runner.schedule.seed + pr.SAMPLE_SEED_OFFSET + 1),
    )
  np.testing.assert_array_equal(rows["decoder_target_tokens"], want["decoder_target_tokens"])
  records = summaries.read_jsonl(os.path.join(pdir, "train", "metrics.jsonl"))
  logged = [r for r in records if "reg/distillation/kl_samples" in r]
  assert logged, records[-1].keys()
  for r in logged:
    assert r["reg/distillation/kl_samples"] >= 0 and r["reg/distillation/kl"] >= 0
    # The router rehearsal runs inside the distillation term, on the rows (no Gaussians saved).
    assert r["reg/distillation/router_rehearsal/old"] > 0
    assert 0.0 < r["reg/distillation/router_rehearsal/old_new_mass"] < 1.0
  assert not any(k.startswith("reg/router_rehearsal/") for r in records for k in r)
  assert rr.load_moments(pdir) is None


def test_accumulated_pool_keeps_every_earlier_generators_rows(tmp_path, prepared_data_dir):
  from lifelong_moe_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from lifelong_moe_jax import partitioning  # pylint: disable=import-outside-toplevel
  from tiny_runner import tiny_runner  # pylint: disable=import-outside-toplevel

  runner = tiny_runner(
    str(tmp_path / "run"),
    prepared_data_dir,
    ["lifelong_moe"],
    [
      'LifelongSchedule.phases = [{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 2},'
      ' {"name": "code_py", "mixture": "lifelong_code_py", "steps": 2, "add_experts": 2},'
      ' {"name": "dialog_en", "mixture": "lifelong_dialog_en", "steps": 2, "add_experts": 2}]',
      "LifelongSchedule.eval_max_batches = 1",
      'MethodOptions.distill_inputs = "teacher_samples"',
      "MethodOptions.teacher_sample_rows = 4",
      'MethodOptions.teacher_sample_pool = "accumulated"',
    ],
  )
  report = runner.run()
  assert report["methods"]["lifelong_moe"]["complete"]
  length = runner.schedule.task_feature_lengths["targets"]
  rows1 = pr.load_samples(runner.phase_dir("lifelong_moe", 1))
  rows2 = pr.load_samples(runner.phase_dir("lifelong_moe", 2))
  assert rows1["decoder_target_tokens"].shape == (4, length)  # phase A's model only
  assert rows2["decoder_target_tokens"].shape == (8, length)
  for k in pr.FEATURES:  # phase B's rows (drawn from A's model) come first, unchanged
    np.testing.assert_array_equal(rows2[k][:4], rows1[k])
  # ... then phase B's final model's own samples with the schedule's key for phase 2.
  model1 = lm.LanguageModel(runner.config_for("lifelong_moe", 1))
  partitioner = partitioning.Partitioner(
    partitioning.create_mesh(partitioning.MeshConfig(-1, 1, 1))
  )
  params1 = checkpoints.restore_model_params(
    runner.layout.final_step_dir("lifelong_moe", 1), model1, partitioner
  )
  with partitioner.context():
    want, _ = pr.sample_rows(
      model1,
      params1,
      num_rows=4,
      length=length,
      rng=jax.random.PRNGKey(runner.schedule.seed + pr.SAMPLE_SEED_OFFSET + 2),
    )
  for k in pr.FEATURES:
    np.testing.assert_array_equal(rows2[k][4:], want[k])
