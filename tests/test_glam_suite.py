"""GLaM suite: every task registers offline; tasks load and render prompts on mocked TFDS data."""

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from lifelong_moe_jax.eval import prompts
import tasks.glam_suite as glam

# Random mock data (tfds.testing.mock_data) cannot satisfy these formats: they are fed realistic
# rows (as tfds.as_numpy yields them) in place of the TFDS read.
HANDCRAFTED = {
  "winogrande": [
    {
      "sentence": b"The trophy does not fit in the suitcase because _ is too big.",
      "option1": b"the trophy",
      "option2": b"the suitcase",
      "label": 0,
    }
  ],
  "super_glue/record": [
    {
      "passage": b"Paris is big.\n@highlight\nParis grows",
      "query": b"@placeholder is big.",
      "entities": [b"Paris", b"Rome"],
      "answers": [b"Paris"],
    }
  ],
  "race/middle": [
    {
      "article": b"Tom has a dog.",
      "questions": [b"What does Tom have?", b"Who has a dog?"],
      "answers": [b"B", b"A"],
      "options": [[b"a cat", b"a dog"], [b"Tom", b"Ann"]],
    }
  ],
  "story_cloze/2016": [
    {"context": b"Ann was hungry. She cooked.", "endings": [b"She ate.", b"She flew."], "label": 1}
  ],
}


def _handcrafted_examples(tfds_name, split, data_dir=None):
  del split, data_dir
  return HANDCRAFTED[tfds_name] * 3


def test_every_suite_task_registers_without_data():
  assert len(glam.SUITE) == 23
  for name, (tfds_name, *_rest) in glam.SUITE.items():
    assert prompts.get_task(name).description.endswith(tfds_name)
    assert name in seqio.TaskRegistry.names()
  families = {v[0].split("/")[0] for v in glam.SUITE.values()}
  assert families == {
    "trivia_qa",
    "natural_questions_open",
    "web_questions",
    "ai2_arc",
    "super_glue",
    "hellaswag",
    "piqa",
    "openbookqa",
    "race",
    "story_cloze",
    "winogrande",
    "anli",
  }


MOCKED = {  # task -> text every rendered prompt contains
  "glam_triviaqa": "\nA:",
  "glam_natural_questions": "?\nA:",
  "glam_web_questions": "\nA:",
  "glam_arc_easy": "\nAnswer:",
  "glam_boolq": "\nanswer:",
  "glam_cb": "true, false, or neither?",
  "glam_copa": "",
  "glam_rte": "True or False?",
  "glam_wic": "used in the same way",
  "glam_wsc": "does the pronoun",
  "glam_multirc": "a correct answer?",
  "glam_hellaswag": ": ",
  "glam_piqa": "Question: ",
  "glam_openbookqa": "",
  "glam_anli_r1": "True, False, or Neither?",
}


@pytest.fixture()
def fresh_caches():
  glam.clear_caches()
  yield
  glam.clear_caches()


@pytest.mark.usefixtures("fresh_caches")
def test_tasks_load_and_render_on_mock_data():
  with tfds.testing.mock_data(
    num_examples=4, num_sub_examples=3, max_value=2, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    for name, marker in MOCKED.items():
      task = prompts.get_task(name)
      rows = list(prompts.iter_rows(task, num_shots=1, max_examples=2))
      assert {r["idx"] for r in rows} == {0, 1}, name
      for r in rows:
        assert marker in r["inputs"] and task.separator in r["inputs"], name
      if task.kind == prompts.GENERATION:
        assert all(r["answers"] and r["targets"].startswith(" ") for r in rows)
      else:
        assert all(sum(r["is_correct"] for r in rows if r["idx"] == i) == 1 for i in (0, 1))


@pytest.mark.usefixtures("fresh_caches")
def test_structured_tasks_render_exact_prompts(monkeypatch):
  monkeypatch.setattr(glam, "load_tfds_examples", _handcrafted_examples)
  wino = prompts.get_task("glam_winogrande").load("validation")[0]
  assert wino.choice_prompts == (
    "The trophy does not fit in the suitcase because the trophy",
    "The trophy does not fit in the suitcase because the suitcase",
  )
  assert wino.choices == (" is too big.", " is too big.") and wino.correct == (0,)
  rec = prompts.get_task("glam_record").load("validation")[0]
  assert rec.prompt == "Paris is big.\n- Paris grows\n-"
  assert rec.choices == (" Paris is big.", " Rome is big.") and rec.correct == (0,)
  race = prompts.get_task("glam_race_middle").load("test")
  assert [r.correct for r in race[:2]] == [(1,), (0,)]
  assert race[0].prompt == "Article: Tom has a dog.\n\nQuestion: What does Tom have?\nAnswer:"
  story = prompts.get_task("glam_storycloze").load("test")[0]
  assert story.choices == (" She ate.", " She flew.") and story.correct == (0,)
  rows = list(prompts.iter_rows(prompts.get_task("glam_winogrande"), num_shots=1, max_examples=1))
  assert rows[1]["inputs"].endswith(
    "\n\nThe trophy does not fit in the suitcase because the suitcase"
  )


def test_converters_skip_unlabelled_examples():
  assert glam.boolq({"passage": b"p", "question": b"q", "label": -1}) == []
  assert glam.story_cloze({"context": b"c", "endings": [b"a", b"b"], "label": -1}) == []
  ex = glam.arc(
    {
      "question": b"Why?",
      "answerKey": 2,
      "choices": {"text": [b"x", b"y", b"z"], "label": np.array([0, 1, 2])},
    }
  )
  assert ex[0].correct == (2,) and ex[0].prompt == "Question: Why?\nAnswer:"


@pytest.mark.usefixtures("fresh_caches")
def test_missing_dataset_is_a_clear_error_without_download(tmp_path, monkeypatch):
  monkeypatch.setenv(glam.GLAM_DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(glam.GlamDataNotFoundError, match="glam_tfds_data_dir.data_dir"):
    prompts.get_task("glam_piqa").load("validation")
