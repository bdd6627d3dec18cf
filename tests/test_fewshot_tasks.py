"""Every embedded few-shot task loads, its prompts render as documented (docs/fewshot.md), and its
seqio task yields the same tokens as the Python path."""

import re

import numpy as np
import pytest
import seqio

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.eval import prompts

import tasks.fewshot as fewshot_tasks  # registers the tasks

# task -> (eval size, demo-split size or None if capped at DEMO_CAP, choices, prompt check)
EXPECTED = {
  "fewshot_wiki_cloze": (500, 4, lambda p: not p.endswith((" ", "\n")) and len(p.split()) >= 7),
  "fewshot_code_next_line": (500, 4, lambda p: p.endswith("\n") and p.count("\n") == 6),
  "fewshot_code_completion": (500, 0, lambda p: p.count("\n") == 6 and p.endswith(("=", "("))),
  "fewshot_dialog_response": (500, 4, lambda p: p.endswith("\n") and 2 <= p.count("\n") <= 4),
  "fewshot_analogy": (500, 4, lambda p: re.fullmatch(r"\S+ is to \S+ as \S+ is to", p)),
  "fewshot_polarity": (100, 2, lambda p: p.startswith("Review: ") and p.endswith("\nSentiment:")),
  "fewshot_quiz": (None, 4, lambda p: p.startswith("Q: ") and p.endswith("?\nA:")),
}


@pytest.fixture(scope="module")
def data_dir(prepared_data_dir):
  with data_dir_lib.using_data_dir(prepared_data_dir):
    yield prepared_data_dir


def test_all_embedded_tasks_are_registered_in_both_registries():
  names = fewshot_tasks.available_tasks()
  assert len(names) >= 6 and set(names) <= set(EXPECTED)
  assert prompts.task_names("fewshot_") == sorted(names) or fewshot_tasks.quiz_dir() is None
  for name in names:
    assert name in seqio.TaskRegistry.names()


def test_library_default_list_is_the_embedded_tasks_with_data():
  """``run_fewshot(task_names=None)`` runs ``prompts.available_tasks()``: the embedded tasks, in
  order, via ``FewShotTask.is_available``, without the library importing ``tasks``."""
  embedded = fewshot_tasks.available_tasks()
  assert [n for n in prompts.available_tasks() if n in EXPECTED] == embedded
  assert not any(n.startswith("glam_") for n in prompts.available_tasks())


def test_fewshot_and_corpus_tasks_share_one_vocabulary_instance():
  import tasks  # pylint: disable=import-outside-toplevel

  shared = vocab_lib.shared_vocabulary()
  assert shared is vocab_lib.shared_vocabulary() and tasks.corpora.VOCABULARY is shared
  for name in ("fewshot_polarity", "lifelong_wiki_en"):
    for feature in seqio.get_mixture_or_task(name).output_features.values():
      assert feature.vocabulary is shared


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_loads_and_prompts_render_as_documented(data_dir, name):
  if name not in fewshot_tasks.available_tasks():
    pytest.skip(f"{name}: its data (bsdgames) is not installed")
  task = prompts.get_task(name)
  size, num_choices, prompt_ok = EXPECTED[name]
  examples = task.load(task.eval_split)
  demos = task.load(task.demo_split)
  if size is not None:
    assert len(examples) == size
  assert len(demos) >= 50
  assert task.load(task.eval_split) == examples  # deterministic
  for ex in examples[:50]:
    assert prompt_ok(ex.prompt), ex.prompt
    if num_choices:
      assert len(ex.choices) == num_choices and len(ex.correct) == 1
      assert len({c.strip().lower() for c in ex.choices}) == num_choices
    else:
      assert ex.answers and ex.answers[0].strip()
  # No held-out query is also a demonstration.
  assert not {e.prompt for e in examples} & {d.prompt for d in demos} or name == "fewshot_analogy"
  rows = list(prompts.iter_rows(task, num_shots=2, max_examples=3))
  first = [r for r in rows if r["idx"] == 0]
  demos_0 = prompts.demonstrations(task, 0, 2, task.eval_split)
  assert first[0]["inputs"] == task.separator.join(
    [d.demonstration() for d in demos_0] + [examples[0].prompt_for(first[0]["choice"])]
  )
  assert sum(r["is_correct"] for r in first) == 1


def test_multiple_choice_answer_positions_are_spread(data_dir):
  examples = prompts.get_task("fewshot_wiki_cloze").load("validation")
  counts = np.bincount([ex.correct[0] for ex in examples], minlength=4)
  assert counts.min() > 0.15 * len(examples)


def test_polarity_is_balanced_and_labelled_from_the_file(data_dir):
  examples = prompts.get_task("fewshot_polarity").load("validation")
  assert sorted(np.bincount([ex.correct[0] for ex in examples]).tolist()) == [50, 50]
  items = dict(fewshot_tasks.polarity_items())
  for ex in examples[:10]:
    text = ex.prompt[len("Review: ") : -len("\nSentiment:")]
    assert items[text] == ex.correct[0]


def test_seqio_task_yields_the_python_rows_and_tokens(data_dir):
  vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
  task = seqio.TaskRegistry.get("fewshot_analogy")
  ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
  got = [ex for _, ex in zip(range(8), ds.as_numpy_iterator())]
  rows = list(prompts.iter_rows(prompts.get_task("fewshot_analogy"), max_examples=2))
  assert len(got) == len(rows) == 8
  for ex, row in zip(got, rows):
    assert ex["inputs_pretokenized"].decode() == row["inputs"]
    inputs, targets = prompts.encode_pair(vocabulary, row["inputs"], row["targets"])
    assert ex["inputs"].tolist() == inputs and ex["targets"].tolist() == targets
    assert vocabulary.decode(targets).strip() == row["targets"].strip()
    target = task.postprocess_fn(row["targets"], example=ex, is_target=True)
    assert (target.idx, target.is_correct, target.num_tokens) == (
      row["idx"],
      row["is_correct"],
      len(targets),
    )


def test_encode_pair_scores_the_continuation_as_it_is_tokenized_in_context(data_dir):
  vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
  inputs, targets = prompts.encode_pair(vocabulary, "The capital is", " Paris")
  assert inputs == vocabulary.encode("The capital is")
  assert inputs + targets == vocabulary.encode("The capital is Paris")
  assert len(targets) == 1  # one piece, not the dummy-prefix space + piece of encode(" Paris")


def test_quiz_pattern_expansion():
  assert fewshot_tasks.expand_quiz_pattern("{G{eorge} }Washington") == [
    "George Washington",
    "G Washington",
    "Washington",
  ]
  assert fewshot_tasks.expand_quiz_pattern("Alabama|Ala|AL") == ["Alabama", "Ala", "AL"]
  assert fewshot_tasks.expand_quiz_pattern("[St.|Saint] John's")[0] == "St. John's"
  assert fewshot_tasks.expand_quiz_pattern("forget{-| }me{-| }not")[0] == "forget-me-not"
  assert fewshot_tasks._split_quiz_fields("a{b:c}:d\\:e:f") == ["a{b:c}", "d\\:e", "f"]


def test_missing_prepared_data_names_the_prepare_command(tmp_path):
  with data_dir_lib.using_data_dir(str(tmp_path)):
    with pytest.raises(FileNotFoundError, match="lifelong_moe_jax.data.prepare"):
      prompts.get_task("fewshot_wiki_cloze").load("validation")
