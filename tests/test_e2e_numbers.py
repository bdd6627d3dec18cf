"""End-to-end numbers, each checked against an independent reference (issue 10).

One tiny lifelong run (gin/lifelong/tiny_test.gin: 2 phases of 8 steps, 2 -> 4 experts, few-shot
callback on) is shared by the tests that need a trained model. Each test recomputes a number the
library reports with a separate, naive computation:

* the runner's per-distribution eval loss / perplexity: a NumPy loss over the same validation
  batches, from the restored final checkpoint of the phase;
* the runner's few-shot accuracy: a separate run of the few-shot CLI entry point on the phase's
  final checkpoint, whose per-choice scores are in turn recomputed by full (uncached) forward passes;
* L2 / EWC penalties on the run's real param trees (expanded 2 -> 4 experts) against NumPy, and the
  EWC Fisher of the tiny model against a naive per-batch squared-gradient loop;
* replay mixtures: per-task fractions of 10k examples drawn through ``pipeline.get_dataset``;
* ``infer`` predictions against greedy decoding by a naive full-recompute loop;
* the GLaM suite converters against hand-written expected prompts / choices / answers.
"""

import json
import os
import shutil
import types

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import infer
from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import registration
from lifelong_moe_jax.eval import fewshot
from lifelong_moe_jax.eval import inference
from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.lifelong import penalties
from lifelong_moe_jax.lifelong import runner as runner_lib
from lifelong_moe_jax.models.lm import LanguageModel
from lifelong_moe_jax.eval.prompts import FewShotExample
import tasks.glam_suite as glam

from lifelong_moe_jax.lifelong.method_mixtures import register_replay_mixture

METHOD = "lifelong_moe"
TASKS = ["lifelong_wiki_en", "lifelong_code_py"]
FEWSHOT_TASK = "fewshot_polarity"
FEWSHOT_EXAMPLES = 16
MAX_LENGTH = 128  # room for 1-shot prompts, so few-shot prompts are not cut


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_data_dir):
  """The tiny 2-phase lifelong_moe run (2 -> 4 experts) with the few-shot callback."""
  base = tmp_path_factory.mktemp("e2e_numbers")
  model_dir = str(base / "run")
  gin.clear_config()
  gin_utils.parse_gin(
    ["lifelong/tiny_test.gin"],
    [
      f"MODEL_DIR = '{model_dir}'",
      'LifelongSchedule.phases = [{"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 8},'
      ' {"name": "code_py", "mixture": "lifelong_code_py", "steps": 8, "add_experts": 2}]',
      f"ModelConfig.max_length = {MAX_LENGTH}",
      "FewshotEval.enabled = True",
      f"FewshotEval.task_names = ['{FEWSHOT_TASK}']",
      "FewshotEval.k = 1",
      f"FewshotEval.max_examples = {FEWSHOT_EXAMPLES}",
      f"RunnerConfig.compilation_cache_dir = '{base / 'jax_cache'}'",
    ],
    finalize=False,
  )
  try:
    runner = runner_lib.LifelongRunner(methods=[METHOD], data_dir=prepared_data_dir)
    report = runner.run()
  finally:
    gin.clear_config()
  return types.SimpleNamespace(
    runner=runner, report=report, model_dir=model_dir, data_dir=prepared_data_dir
  )


def _final(run, index):
  """(model, host params, step dir) of the final checkpoint of phase ``index``."""
  model = LanguageModel(run.runner.config_for(METHOD, index))
  step_dir = run.runner.final_step_dir(METHOD, index)
  params = checkpoints.restore_model_params(step_dir, model, run.runner.partitioner)
  return model, jax.device_get(nn.unbox(params)), step_dir


def _global_batches(run, task, split, batch_size, count, *, shuffle, seed, repeat):
  """The first ``count`` global batches as documented (``training.run.resolve_data_shards``):
  shard ``s`` of ``data_shards`` is the seqio stream ``ShardInfo(s, data_shards)`` batched to
  ``batch_size // data_shards`` rows, and a global batch is the shards' rows in shard order."""
  shards = run.runner.layout.data_shards or jax.process_count()
  streams = [
    pipeline.get_dataset(
      task,
      run.runner.schedule.task_feature_lengths,
      split,
      batch_size // shards,
      shuffle=shuffle,
      seed=seed,
      repeat=repeat,
      pack=True,
      shard_index=s,
      num_shards=shards,
      data_dir=run.data_dir,
    ).as_numpy_iterator()
    for s in range(shards)
  ]
  out = []
  for _ in range(count):
    parts = [next(it) for it in streams]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _assert_no_drop(config):
  """With cf * k >= E an expert has room for every token of a group: no token is dropped, so an
  unsharded recomputation routes exactly like the sharded / cached library paths."""
  assert config.eval_capacity_factor * config.top_k >= config.num_experts, config


# ------------------------------------------------------------------------- 1. eval loss / ppl
def test_reported_loss_and_perplexity_equal_a_naive_recomputation(trained):
  sched = trained.runner.schedule
  method_report = trained.report["methods"][METHOD]
  assert sched.eval_max_batches == 2
  for index in (0, 1):
    model, params, _ = _final(trained, index)
    _assert_no_drop(model.config)
    logits_fn = jax.jit(model.logits)
    reported = method_report["phases"][index]["eval"]
    for task in TASKS:
      batches = _global_batches(
        trained, task, "validation", sched.eval_batch, 2, shuffle=False, seed=0, repeat=False
      )
      nll = weight = correct = 0.0
      for batch in batches:
        logp = _log_softmax64(logits_fn(params, batch))
        targets = batch["decoder_target_tokens"]
        weights = batch["decoder_loss_weights"].astype(np.float64)
        token_ll = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        nll -= float(np.sum(token_ll * weights))
        weight += float(np.sum(weights))
        correct += float(np.sum((np.argmax(logp, axis=-1) == targets) * weights))
      loss = nll / weight
      got = reported[task]
      assert got["num_tokens"] == weight and got["num_batches"] == 2, (index, task)
      assert got["loss"] == pytest.approx(loss, rel=1e-5), (index, task)
      assert got["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5), (index, task)
      assert method_report["perplexity"][task][index] == pytest.approx(np.exp(loss), rel=1e-5)
      # argmax hits: at most one near-tie may flip between the sharded and the unsharded pass
      assert abs(got["accuracy"] - correct / weight) <= 1.5 / weight, (index, task)


# ------------------------------------------------------------------------- 2. few-shot accuracy
def _naive_choice_scores(model, params, pairs):
  """sum log p(continuation | [BOS] + prefix) per (prefix, continuation) pair, full forward passes
  (no KV cache), all rows padded to ``max_length`` in one batch. A prefix too long for the context
  keeps its last ``max_length - 1 - C`` tokens, ``C`` the longest continuation rounded up to a
  power of two >= 4 (the documented few-shot rule: prompts are cut from the left)."""
  max_length = model.config.max_length
  c_len = 4
  while c_len < max(len(cont) for _, cont in pairs):
    c_len *= 2
  limit = max_length - 1 - c_len
  rows = len(pairs)
  inputs = np.zeros((rows, max_length), np.int32)
  targets = np.zeros((rows, max_length), np.int32)
  weights = np.zeros((rows, max_length), np.float32)
  for i, (ctx, cont) in enumerate(pairs):
    ctx = list(ctx)[-limit:]
    seq = ctx + list(cont)
    targets[i, : len(seq)] = seq
    inputs[i, 1 : len(seq)] = seq[:-1]  # BOS = 0 first
    weights[i, len(ctx) : len(seq)] = 1.0
  batch = {
    "decoder_input_tokens": inputs,
    "decoder_target_tokens": targets,
    "decoder_loss_weights": weights,
  }
  logp = _log_softmax64(jax.jit(model.logits)(params, batch))
  token_ll = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return np.sum(token_ll * weights, axis=1)


def test_fewshot_callback_equals_a_separate_fewshot_run(trained, tmp_path):
  vocabulary = trained.runner.vocabulary
  for index in (0, 1):
    model, params, step_dir = _final(trained, index)
    _assert_no_drop(model.config)
    recorded = trained.report["methods"][METHOD]["phases"][index]["callbacks"]["fewshot"]
    out_dir = str(tmp_path / f"phase{index}")
    separate = fewshot.fewshot_checkpoint(
      checkpoint_path=step_dir,
      output_dir=out_dir,
      task_names=[FEWSHOT_TASK],
      num_shots=1,
      max_examples=FEWSHOT_EXAMPLES,
      data_dir=trained.data_dir,
    )[FEWSHOT_TASK]
    for key in ("accuracy", "accuracy_norm", "chance", "num_examples"):
      assert recorded[FEWSHOT_TASK][key] == pytest.approx(separate[key], abs=1e-9), (index, key)
    assert separate["num_examples"] == FEWSHOT_EXAMPLES
    # The separate run's per-choice scores, recomputed without the KV cache.
    with open(os.path.join(out_dir, f"{FEWSHOT_TASK}-k1.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
    assert len(records) == FEWSHOT_EXAMPLES
    pairs, owners = [], []
    for q, rec in enumerate(records):
      for c, choice in enumerate(rec["choices"]):
        text = rec.get("choice_inputs", {}).get(str(c), rec["inputs"])
        pairs.append(prompts.encode_pair(vocabulary, text, choice))
        owners.append((q, c))
    naive = _naive_choice_scores(model, params, pairs)
    hits, compared = 0, 0
    for q, rec in enumerate(records):
      scores = np.array([naive[i] for i, (o, _) in enumerate(owners) if o == q])
      np.testing.assert_allclose(rec["scores"], scores, rtol=1e-5, atol=2e-3)
      top2 = np.sort(scores)[-2:]
      if top2[1] - top2[0] > 5e-3:  # not a near-tie: the argmax must agree
        assert rec["predicted"] == int(np.argmax(scores)), (index, q)
        compared += 1
      hits += int(np.argmax(scores)) in rec.get("correct", [])
    assert compared >= FEWSHOT_EXAMPLES - 2
    near_ties = FEWSHOT_EXAMPLES - compared
    assert 100.0 * hits / len(records) == pytest.approx(
      separate["accuracy"], abs=near_ties * 100.0 / FEWSHOT_EXAMPLES + 1e-9
    )


# ------------------------------------------------------------------------- 3. penalties, Fisher
def _flat_with_expert_axis(params, axes):
  """{path: (float64 array, index of the 'expert' logical axis or None)}."""
  flat_p = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat_a = flax.traverse_util.flatten_dict(flax.core.unfreeze(axes))
  out = {}
  for path, value in flat_p.items():
    spec = tuple(flat_a[path] or ())
    out[path] = (np.asarray(value, np.float64), spec.index("expert") if "expert" in spec else None)
  return out


def test_l2_and_ewc_penalties_on_the_runs_expanded_params_equal_numpy(trained):
  model0, p0, _ = _final(trained, 0)
  _, p1, _ = _final(trained, 1)
  axes0 = model0.params_logical_axes()
  old, added = model0.config.num_experts, 2
  anchors = _flat_with_expert_axis(p0, axes0)
  current = flax.traverse_util.flatten_dict(p1)
  rng = np.random.default_rng(0)
  fisher_flat = {path: rng.uniform(0.0, 2.0, a.shape) for path, (a, _) in anchors.items()}
  want_l2 = want_ewc = 0.0
  expert_leaves = 0
  for path, (anchor, axis) in anchors.items():
    cur = np.asarray(current[path], np.float64)
    if axis is not None:  # only the old experts' slices are anchored
      assert cur.shape[axis] == old + added
      cur = np.take(cur, np.arange(old), axis=axis)
      expert_leaves += 1
    want_l2 += np.sum((cur - anchor) ** 2)
    want_ewc += np.sum(fisher_flat[path] * (cur - anchor) ** 2)
  assert expert_leaves >= 3  # wi, wo, router kernel
  assert want_l2 > 0.0  # shared weights trained in phase 1

  l2 = penalties.l2_anchor(p0).expand_to(axes0, added)
  term, metrics = penalties.L2Penalty(0.37, l2)(p1, None, None, l2, None)
  assert float(metrics["distance"]) == pytest.approx(want_l2, rel=1e-5)
  assert float(term) == pytest.approx(0.185 * want_l2, rel=1e-5)

  fisher = flax.traverse_util.unflatten_dict(
    {k: v.astype(np.float32) for k, v in fisher_flat.items()}
  )
  ewc = penalties.ewc_anchor(p0, fisher).expand_to(axes0, added)
  term, metrics = penalties.EWCPenalty(3.0)(p1, None, None, ewc, None)
  assert float(metrics["distance"]) == pytest.approx(want_ewc, rel=1e-5)
  assert float(term) == pytest.approx(1.5 * want_ewc, rel=1e-5)


def test_estimate_fisher_on_the_tiny_model_equals_a_naive_batch_loop(trained):
  model, params, _ = _final(trained, 0)
  batches = _global_batches(
    trained,
    "lifelong_wiki_en",
    "train",
    trained.runner.schedule.batch_size,
    3,
    shuffle=True,
    seed=7919,
    repeat=True,
  )
  fisher = penalties.estimate_fisher(
    model, params, iter(batches), num_batches=2, estimator="batch_gradient"
  )

  def mean_token_nll(p, batch):  # written out here, not lm.loss
    logp = jax.nn.log_softmax(model.logits(p, batch), axis=-1)
    ll = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
    w = batch["decoder_loss_weights"].astype(jnp.float32)
    return -jnp.sum(ll * w) / jnp.sum(w)

  grad_fn = jax.jit(jax.grad(mean_token_nll))
  squares = [
    jax.tree_util.tree_map(lambda g: np.square(np.asarray(g, np.float64)), grad_fn(params, b))
    for b in batches[:2]  # num_batches=2: the third batch must not count
  ]
  want = jax.tree_util.tree_map(lambda a, b: (a + b) / 2.0, *squares)
  got_flat = flax.traverse_util.flatten_dict(jax.device_get(fisher))
  want_flat = flax.traverse_util.flatten_dict(want)
  assert got_flat.keys() == want_flat.keys()
  for path, w in want_flat.items():
    g = np.asarray(got_flat[path])
    assert g.dtype == np.float32 and g.shape == w.shape, path
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-4 * float(w.max()) + 1e-30, err_msg=path)
  assert max(float(w.max()) for w in want_flat.values()) > 0.0


# ------------------------------------------------------------------------- 4. replay rates
WORDS = {"rp_alpha": "apple", "rp_bravo": "zebra", "rp_charlie": "violin", "rp_delta": "copper"}


def test_replay_mixture_samples_at_its_configured_rates(tmp_path, prepared_data_dir):
  data_dir = tmp_path / "data"
  shutil.copytree(os.path.join(prepared_data_dir, "vocab"), data_dir / "vocab")
  for name, word in WORDS.items():
    folder = tmp_path / "text" / name
    folder.mkdir(parents=True)
    docs = [" ".join([word] * (5 + i % 7)) for i in range(120)]
    (folder / "docs.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    registration.register_text_distribution(name, folder=str(folder), data_dir=str(data_dir))
  registration.register_mixture("rp_current", {"rp_alpha": 3.0, "rp_bravo": 1.0})
  fraction = 0.3
  name = register_replay_mixture(
    "rp_current", ["lifelong_rp_charlie", "lifelong_rp_delta"], fraction
  )
  expected = {
    "lifelong_rp_alpha": (1 - fraction) * 0.75,
    "lifelong_rp_bravo": (1 - fraction) * 0.25,
    "lifelong_rp_charlie": fraction / 2,
    "lifelong_rp_delta": fraction / 2,
  }
  with data_dir_lib.using_data_dir(str(data_dir)):
    vocabulary = seqio.get_mixture_or_task("lifelong_rp_alpha").output_features["targets"]
    vocabulary = vocabulary.vocabulary
    owner = {}
    for dist, word in WORDS.items():
      for token in vocabulary.encode(" ".join([word] * 4)):
        assert owner.setdefault(token, dist) == dist, f"token {token} shared: pick other words"
  n, batch = 10000, 500
  ds = pipeline.get_dataset(
    name,
    {"targets": 64},
    "train",
    batch,
    shuffle=True,
    seed=5,
    repeat=True,
    pack=False,
    data_dir=str(data_dir),
  )
  counts = dict.fromkeys(expected, 0)
  for b in ds.take(n // batch).as_numpy_iterator():
    for row in b["decoder_target_tokens"]:
      dists = {owner[t] for t in row if t in owner}
      assert len(dists) == 1, row  # every example comes from exactly one distribution
      counts[f"lifelong_{dists.pop()}"] += 1
  assert sum(counts.values()) == n
  for task, rate in expected.items():
    sigma = (rate * (1 - rate) / n) ** 0.5
    assert abs(counts[task] / n - rate) < 4 * sigma, (task, counts[task] / n, rate)


# ------------------------------------------------------------------------- 5. infer = greedy
def _naive_greedy(model, params, prompt_ids, steps, eos_id):
  """Greedy continuation by full recomputation: argmax (pad id excluded) of the last position's
  logits over ``[BOS] + prompt + generated``, one token at a time; stops after EOS.

  Returns (ids including EOS if emitted, summed log-probs, smallest top-2 logit margin)."""
  logits_fn = jax.jit(model.logits)
  max_length = model.config.max_length
  seq = list(prompt_ids)
  out, score, margin = [], 0.0, np.inf
  for _ in range(steps):
    inputs = np.zeros((1, max_length), np.int32)
    targets = np.zeros((1, max_length), np.int32)
    inputs[0, 1 : len(seq) + 1] = seq
    targets[0, : len(seq) + 1] = seq + [1]  # the next target is unknown: any non-pad id (routed)
    batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets}
    logits = np.asarray(logits_fn(params, batch), np.float64)[0, len(seq)]
    row = logits.copy()
    row[0] = -np.inf  # never the pad id
    token = int(np.argmax(row))
    top2 = np.sort(row)[-2:]
    margin = min(margin, top2[1] - top2[0])
    score += float(_log_softmax64(logits)[token])  # log-prob under the full distribution
    out.append(token)
    seq.append(token)
    if token == eos_id:
      break
  return out, score, margin


def test_infer_predictions_equal_naive_greedy_decoding(trained, tmp_path):
  model, params, step_dir = _final(trained, 1)
  _assert_no_drop(model.config)
  vocabulary = trained.runner.vocabulary
  eos = vocabulary.eos_id
  compared = 0
  prompt = "The history of the city"
  text = infer.infer(
    checkpoint_path=step_dir, prompt=prompt, max_decode_len=8, data_dir=trained.data_dir
  )
  ids, _, margin = _naive_greedy(model, params, vocabulary.encode(prompt), 8, eos)
  if margin > 1e-4:
    assert text == vocabulary.decode([t for t in ids if t != eos])
    compared += 1
  paths = infer.infer(
    checkpoint_path=step_dir,
    mixture_or_task_name="lifelong_wiki_en",
    mode="predict",
    batch_size=8,
    max_examples=4,
    max_decode_len=6,
    output_dir=str(tmp_path),
    data_dir=trained.data_dir,
  )
  with open(paths["lifelong_wiki_en"], encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  with data_dir_lib.using_data_dir(trained.data_dir):
    task = seqio.get_mixture_or_task("lifelong_wiki_en")
    examples = list(inference.task_examples(task, "validation", model.config.max_length, 4))
  assert len(records) == len(examples) == 4
  for rec, ex in zip(records, examples):
    prompt_ids, _ = inference.split_example(ex, 0.5)
    assert rec["inputs"] == vocabulary.decode(prompt_ids)
    ids, score, margin = _naive_greedy(model, params, prompt_ids, 6, eos)
    if margin <= 1e-4:  # a near-tie may go either way between the two computations
      continue
    assert rec["prediction"] == vocabulary.decode([t for t in ids if t != eos])
    assert rec["prediction_score"] == pytest.approx(score, rel=1e-4, abs=1e-3)
    compared += 1
  assert compared >= 4


# ------------------------------------------------------------------------- 6. GLaM converters
def _mc(prompt, choices, correct):
  return [FewShotExample(prompt=prompt, choices=tuple(choices), correct=tuple(correct))]


GLAM_CASES = [
  (
    glam.triviaqa,
    {
      "question": b"Which city is the capital of France? ",
      "answer": {"value": b"Paris", "aliases": [b"Paris", b" paris ", b"", b"City of Light"]},
    },
    [
      FewShotExample(
        prompt="Q: Which city is the capital of France?\nA:",
        answers=(" Paris", " paris", " City of Light"),
      )
    ],
  ),
  (
    glam.natural_questions,
    {"question": b"who wrote hamlet", "answer": [b"William Shakespeare", b"Shakespeare"]},
    [
      FewShotExample(
        prompt="Q: who wrote hamlet?\nA:", answers=(" William Shakespeare", " Shakespeare")
      )
    ],
  ),
  (
    glam.natural_questions,
    {"question": b"what is 2+2?", "answer": [b"4"]},
    [FewShotExample(prompt="Q: what is 2+2?\nA:", answers=(" 4",))],
  ),
  (
    glam.web_questions,
    {"question": b"where is the eiffel tower?", "answers": [b"Paris", b"France"]},
    [FewShotExample(prompt="Q: where is the eiffel tower?\nA:", answers=(" Paris", " France"))],
  ),
  (glam.web_questions, {"question": b"q?", "answers": [b" ", b""]}, []),  # no usable answer
  (
    glam.arc,
    {
      "question": b"Which is a metal?",
      "answerKey": 3,
      "choices": {"text": [b"wood", b"glass", b"iron"], "label": np.array([1, 2, 3])},
    },
    _mc("Question: Which is a metal?\nAnswer:", [" wood", " glass", " iron"], [2]),
  ),
  (
    glam.boolq,
    {"passage": b"Cats are mammals.", "question": b"are cats mammals?", "label": 1},
    _mc("Cats are mammals.\nquestion: are cats mammals?\nanswer:", [" no", " yes"], [1]),
  ),
  (
    glam.cb,
    {"premise": b"It rained.", "hypothesis": b"The ground is dry.", "label": 1},
    _mc(
      "It rained.\nquestion: The ground is dry. true, false, or neither?\nanswer:",
      [" true", " false", " neither"],
      [1],
    ),
  ),
  (
    glam.copa,
    {
      "premise": b"The man broke his toe.",
      "question": b"cause",
      "choice1": b"He dropped a hammer on his foot.",
      "choice2": b"He got a hole in his sock.",
      "label": 0,
    },
    _mc(
      "The man broke his toe because",
      [" he dropped a hammer on his foot.", " he got a hole in his sock."],
      [0],
    ),
  ),
  (
    glam.copa,
    {
      "premise": b"I pushed the door.",
      "question": b"effect",
      "choice1": b"It stayed shut.",
      "choice2": b"It opened.",
      "label": 1,
    },
    _mc("I pushed the door therefore", [" it stayed shut.", " it opened."], [1]),
  ),
  (
    glam.rte,
    {"premise": b"A dog barks.", "hypothesis": b"An animal makes noise.", "label": 0},
    _mc(
      "A dog barks.\nquestion: An animal makes noise. True or False?\nanswer:",
      [" True", " False"],
      [0],
    ),
  ),
  (
    glam.wic,
    {
      "sentence1": b"He sat on the bank.",
      "sentence2": b"The bank lent money.",
      "word": b"bank",
      "label": 0,
    },
    _mc(
      "He sat on the bank.\nThe bank lent money.\nquestion: Is the word 'bank' used in the same "
      "way in the two sentences above?\nanswer:",
      [" no", " yes"],
      [0],
    ),
  ),
  (
    glam.wsc,
    {
      "text": b"Mark told Pete he was late.",
      "span1_text": b"Pete",
      "span2_text": b"he",
      "label": 1,
    },
    _mc(
      'Mark told Pete he was late.\nquestion: In the passage above, does the pronoun "he" refer '
      "to Pete?\nanswer:",
      [" no", " yes"],
      [1],
    ),
  ),
  (
    glam.multirc,
    {
      "paragraph": b"Sam has two cats.",
      "question": b"How many cats?",
      "answer": b"two",
      "label": 1,
    },
    _mc(
      'Sam has two cats.\nquestion: How many cats?\nIs "two" a correct answer?\nanswer:',
      [" no", " yes"],
      [1],
    ),
  ),
  (
    glam.hellaswag,
    {
      "activity_label": b"Baking",
      "context": b"She puts the tray in the oven and",
      "endings": [b" waits. ", b"sings loudly.", b"eats the oven.", b"leaves."],
      "label": 0,
    },
    _mc(
      "Baking: She puts the tray in the oven and",
      [" waits.", " sings loudly.", " eats the oven.", " leaves."],
      [0],
    ),
  ),
  (
    glam.piqa,
    {"goal": b"Open a jar.", "sol1": b"Twist the lid.", "sol2": b"Eat the lid.", "label": 0},
    _mc("Question: Open a jar.\nAnswer:", [" Twist the lid.", " Eat the lid."], [0]),
  ),
  (
    glam.openbookqa,
    {
      "question": {
        "stem": b"The sun is a",
        "choice_A": b"planet",
        "choice_B": b"star",
        "choice_C": b"moon",
        "choice_D": b"comet",
      },
      "answerKey": 1,
    },
    _mc("The sun is a", [" planet", " star", " moon", " comet"], [1]),
  ),
  (
    glam.anli,
    {"context": b"Tom is tall.", "hypothesis": b"Tom is short.", "label": 2},
    _mc(
      "Tom is tall.\nQuestion: Tom is short. True, False, or Neither?\nAnswer:",
      [" True", " Neither", " False"],
      [2],
    ),
  ),
  (glam.rte, {"premise": b"p", "hypothesis": b"h", "label": -1}, []),  # unlabelled test row
  (glam.anli, {"context": b"c", "hypothesis": b"h", "label": 3}, []),  # out of range
]


@pytest.mark.parametrize(
  "convert,row,expected", GLAM_CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(GLAM_CASES)]
)
def test_glam_converter_gives_the_exact_prompt_choices_and_answer(convert, row, expected):
  assert list(convert(row)) == expected
