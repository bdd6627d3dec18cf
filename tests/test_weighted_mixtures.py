"""Weighted runner mixtures (``RunnerConfig.mixtures = {name: {member: rate}}``) and the
``multitask_final`` method's model plan."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong import runner as runner_lib
from lifelong_moe_jax.lifelong.phase_layout import RunLayout
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule, ScheduleError
from lifelong_moe_jax.models.config import ModelConfig

FEATURES = {
  "targets": seqio.Feature(seqio.PassThroughVocabulary(16), add_eos=False, dtype=tf.int32)
}


def _synthetic_task(name: str, token: int) -> None:
  """Task ``lifelong_<name>``: endless one-token examples ``[token]`` (no files, no vocabulary)."""

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensors({"targets": tf.constant([token], tf.int32)}).repeat()

  task = f"lifelong_{name}"
  if task in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task)
  seqio.TaskRegistry.add(
    task,
    source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
    output_features=FEATURES,
    preprocessors=[],
    metric_fns=[],
  )


def _sample(mixture: str, n: int) -> np.ndarray:
  ds = pipeline.get_dataset(
    mixture, {"targets": 4}, "train", 500, shuffle=True, seed=3, repeat=True, pack=False
  )
  first = [b["decoder_target_tokens"][:, 0] for b in ds.take(n // 500).as_numpy_iterator()]
  return np.concatenate(first)


def test_weighted_mixture_samples_at_the_configured_rates():
  _synthetic_task("synth_web", 1)
  _synthetic_task("synth_wiki", 2)
  _synthetic_task("synth_code", 3)
  runner_lib.register_distributions(
    None,
    {
      "synth_weighted": {"synth_web": 81, "lifelong_synth_wiki": 19},  # names or task names
      "synth_equal": ["synth_web", "synth_wiki", "synth_code"],
    },
  )
  mixture = seqio.get_mixture_or_task("synth_weighted")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
    "lifelong_synth_web": 81.0,
    "lifelong_synth_wiki": 19.0,
  }
  n = 10000
  tokens = _sample("synth_weighted", n)
  assert len(tokens) == n and set(np.unique(tokens)) == {1, 2}
  share = float(np.mean(tokens == 1))
  sigma = (0.81 * 0.19 / n) ** 0.5  # binomial standard error, about 0.004
  assert abs(share - 0.81) < 4 * sigma, share
  equal = _sample("synth_equal", 3000)
  for token in (1, 2, 3):
    assert abs(float(np.mean(equal == token)) - 1 / 3) < 4 * (2 / 9 / 3000) ** 0.5


@pytest.mark.parametrize(
  "rates",
  [{"synth_web": 0}, {"synth_web": -1.0}, {"synth_web": "81"}, {"nope_not_registered": 1.0}],
)
def test_bad_weighted_mixtures_are_refused(rates):
  _synthetic_task("synth_web", 1)
  with pytest.raises(ScheduleError, match="RunnerConfig.mixtures"):
    runner_lib.register_distributions(None, {"synth_bad": rates})


def test_multitask_final_has_the_final_expert_count_from_phase_0():
  schedule = LifelongSchedule(
    phases=[
      {"name": "a", "mixture": "lifelong_wiki_en", "steps": 4},
      {"name": "b", "mixture": "lifelong_code_py", "steps": 4, "add_experts": 2},
      {"name": "c", "mixture": "lifelong_dialog_en", "steps": 4, "add_experts": 4},
    ]
  )
  layout = RunLayout(
    "/tmp/unused", schedule, methods_lib.MethodOptions(), ModelConfig(num_experts=2, max_length=32)
  )
  experts = {
    m: [layout.config_for(m, i).num_experts for i in range(3)]
    for m in ("multitask", "multitask_final", "lifelong_moe")
  }
  assert experts == {
    "multitask": [2, 2, 2],
    "multitask_final": [8, 8, 8],
    "lifelong_moe": [2, 4, 8],
  }
  final = methods_lib.get_method("multitask_final")
  assert final.joint and final.final_experts and not final.expand
  assert final.added_experts(schedule, 1) == 0 and not layout.is_shared("multitask_final", 0)
  assert layout.mixture_for("multitask_final", 0) == layout.mixture_for("multitask", 2)
  with pytest.raises(methods_lib.MethodError, match="final_experts"):
    methods_lib.Method("bad", "", final_experts=True, expand=True)
  with pytest.raises(methods_lib.MethodError, match="dense"):
    final.validate(schedule, ModelConfig(num_experts=0, max_length=32))
