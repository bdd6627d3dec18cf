"""The few-shot suite of GLaM / Lifelong-MoE on TFDS catalog datasets, for users who have the data.

Importing this module registers one few-shot task (and seqio task) per dataset below; nothing is
read, and nothing touches the network, until a task is evaluated. The data must already be prepared
in a TFDS data dir (``glam_tfds_data_dir.data_dir`` in gin, ``$GLAM_TFDS_DATA_DIR``, or TFDS's
default ``~/tensorflow_datasets``); loading never downloads (``download=False``).

Prompt formats follow GPT-3 (Brown et al. 2020, appendix G) as used by GLaM: open-domain QA as
``Q: ...\\nA:`` generation scored by exact match / F1 against all aliases; everything else as rank
classification of the candidate continuations (see ``SUITE`` and docs/fewshot.md). Demonstrations
come from the first ``DEMO_CAP`` examples of the demonstration split. Examples without a usable
label (unlabelled test splits) are skipped.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Sequence

import gin

from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.eval.prompts import FewShotExample, FewShotTask

DEMO_CAP = 1000
GLAM_DATA_DIR_ENV = "GLAM_TFDS_DATA_DIR"
Converter = Callable[[dict[str, Any]], Iterable[FewShotExample]]


@gin.configurable
def glam_tfds_data_dir(data_dir: str | None = None) -> str | None:
  """Gin hook: the TFDS data dir holding the suite's datasets (None: $GLAM_TFDS_DATA_DIR or TFDS's
  default)."""
  return data_dir or os.environ.get(GLAM_DATA_DIR_ENV) or None


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def _texts(values: Any) -> list[str]:
  return [_text(v) for v in values]


def _label(value: Any, num_choices: int) -> int | None:
  """A label in [0, num_choices) or None (unlabelled, e.g. -1 in test splits)."""
  try:
    label = int(value)
  except (TypeError, ValueError):
    return None
  return label if 0 <= label < num_choices else None


def _mc(
  prompt: str, choices: Sequence[str], label: int | None, choice_prompts: Sequence[str] = ()
) -> list[FewShotExample]:
  if label is None or len(choices) < 2:
    return []
  return [
    FewShotExample(
      prompt=prompt, choices=tuple(choices), correct=(label,), choice_prompts=tuple(choice_prompts)
    )
  ]


# ------------------------------------------------------------------------------- converters
def _qa(ex: dict[str, Any], question: str, answers: Sequence[str]) -> list[FewShotExample]:
  answers = [a for a in dict.fromkeys(a.strip() for a in answers) if a]
  if not answers:
    return []
  return [
    FewShotExample(prompt=f"Q: {question.strip()}\nA:", answers=tuple(" " + a for a in answers))
  ]


def triviaqa(ex):
  answer = ex["answer"]
  return _qa(ex, _text(ex["question"]), [_text(answer["value"])] + _texts(answer["aliases"]))


def natural_questions(ex):
  question = _text(ex["question"]).strip()
  return _qa(ex, question if question.endswith("?") else question + "?", _texts(ex["answer"]))


def web_questions(ex):
  return _qa(ex, _text(ex["question"]), _texts(ex["answers"]))


def arc(ex):
  choices = ex["choices"]
  labels = [int(x) for x in choices["label"]]
  answer = int(ex["answerKey"])
  label = labels.index(answer) if answer in labels else None
  return _mc(
    f"Question: {_text(ex['question'])}\nAnswer:", [" " + t for t in _texts(choices["text"])], label
  )


def boolq(ex):
  question = _text(ex["question"]).strip().rstrip("?")
  return _mc(
    f"{_text(ex['passage'])}\nquestion: {question}?\nanswer:",
    [" no", " yes"],
    _label(ex["label"], 2),
  )


def cb(ex):
  return _mc(
    f"{_text(ex['premise'])}\nquestion: {_text(ex['hypothesis'])} true, false, or "
    "neither?\nanswer:",
    [" true", " false", " neither"],
    _label(ex["label"], 3),
  )


def copa(ex):
  connector = " because" if _text(ex["question"]) == "cause" else " therefore"
  premise = _text(ex["premise"]).strip().rstrip(".")

  def lower_first(s: str) -> str:
    s = s.strip()
    return s[:1].lower() + s[1:]

  return _mc(
    premise + connector,
    [" " + lower_first(_text(ex["choice1"])), " " + lower_first(_text(ex["choice2"]))],
    _label(ex["label"], 2),
  )


def rte(ex):
  return _mc(
    f"{_text(ex['premise'])}\nquestion: {_text(ex['hypothesis'])} True or False?\nanswer:",
    [" True", " False"],
    _label(ex["label"], 2),
  )


def wic(ex):
  return _mc(
    f"{_text(ex['sentence1'])}\n{_text(ex['sentence2'])}\nquestion: Is the word "
    f"'{_text(ex['word'])}' used in the same way in the two sentences above?\nanswer:",
    [" no", " yes"],
    _label(ex["label"], 2),
  )


def wsc(ex):
  return _mc(
    f"{_text(ex['text'])}\nquestion: In the passage above, does the pronoun "
    f"\"{_text(ex['span2_text'])}\" refer to {_text(ex['span1_text'])}?\nanswer:",
    [" no", " yes"],
    _label(ex["label"], 2),
  )


def record(ex):
  query = _text(ex["query"])
  if "@placeholder" not in query:
    return []
  before, after = query.split("@placeholder", 1)
  passage = _text(ex["passage"]).replace("@highlight\n", "- ")
  entities = list(dict.fromkeys(_texts(ex["entities"])))
  answers = set(_texts(ex["answers"]))
  correct = tuple(i for i, e in enumerate(entities) if e in answers)
  if not correct or len(entities) < 2:
    return []
  prompt = f"{passage}\n-" + (" " + before.rstrip() if before.strip() else "")
  return [
    FewShotExample(prompt=prompt, choices=tuple(" " + e + after for e in entities), correct=correct)
  ]


def multirc(ex):
  return _mc(
    f"{_text(ex['paragraph'])}\nquestion: {_text(ex['question'])}\nIs \"{_text(ex['answer'])}\""
    " a correct answer?\nanswer:",
    [" no", " yes"],
    _label(ex["label"], 2),
  )


def hellaswag(ex):
  context = f"{_text(ex['activity_label'])}: {_text(ex['context'])}"
  endings = _texts(ex["endings"])
  return _mc(context, [" " + e.strip() for e in endings], _label(ex["label"], len(endings)))


def piqa(ex):
  return _mc(
    f"Question: {_text(ex['goal'])}\nAnswer:",
    [" " + _text(ex["sol1"]), " " + _text(ex["sol2"])],
    _label(ex["label"], 2),
  )


def openbookqa(ex):
  q = ex["question"]
  choices = [" " + _text(q[f"choice_{c}"]) for c in "ABCD"]
  return _mc(_text(q["stem"]), choices, _label(ex["answerKey"], 4))


def race(ex):
  out = []
  article = _text(ex["article"])
  for question, answer, options in zip(
    _texts(ex["questions"]), _texts(ex["answers"]), ex["options"]
  ):
    options = _texts(options)
    label = "ABCD".find(answer.strip()) if len(answer.strip()) == 1 else -1
    out += _mc(
      f"Article: {article}\n\nQuestion: {question}\nAnswer:",
      [" " + o for o in options],
      label if 0 <= label < len(options) else None,
    )
  return out


def story_cloze(ex):
  endings = _texts(ex["endings"])
  label = _label(ex["label"], len(endings) + 1)  # AnswerRightEnding is 1-based
  return _mc(
    _text(ex["context"]), [" " + e.strip() for e in endings], None if not label else label - 1
  )


def winogrande(ex):
  sentence = _text(ex["sentence"])
  if sentence.count("_") != 1:
    return []
  before, after = sentence.split("_")
  options = [_text(ex["option1"]), _text(ex["option2"])]
  # Partial scoring (GPT-3): each option is substituted into the prompt; the shared remainder is
  # the continuation whose likelihood is compared.
  return _mc(
    before + options[0],
    [after, after],
    _label(ex["label"], 2),
    choice_prompts=[before + o for o in options],
  )


def anli(ex):
  return _mc(
    f"{_text(ex['context'])}\nQuestion: {_text(ex['hypothesis'])} True, False, or "
    "Neither?\nAnswer:",
    [" True", " Neither", " False"],
    _label(ex["label"], 3),
  )


# ------------------------------------------------------------------------------- the suite
# name -> (tfds name, eval split, demonstration split, converter, kind)
_GEN, _MC = prompts.GENERATION, prompts.MULTIPLE_CHOICE
SUITE: dict[str, tuple[str, str, str, Converter, str]] = {
  "glam_triviaqa": ("trivia_qa/rc.nocontext", "validation", "train", triviaqa, _GEN),
  "glam_natural_questions": (
    "natural_questions_open",
    "validation",
    "train",
    natural_questions,
    _GEN,
  ),
  "glam_web_questions": ("web_questions", "test", "train", web_questions, _GEN),
  "glam_arc_easy": ("ai2_arc/ARC-Easy", "test", "train", arc, _MC),
  "glam_arc_challenge": ("ai2_arc/ARC-Challenge", "test", "train", arc, _MC),
  "glam_boolq": ("super_glue/boolq", "validation", "train", boolq, _MC),
  "glam_cb": ("super_glue/cb", "validation", "train", cb, _MC),
  "glam_copa": ("super_glue/copa", "validation", "train", copa, _MC),
  "glam_rte": ("super_glue/rte", "validation", "train", rte, _MC),
  "glam_wic": ("super_glue/wic", "validation", "train", wic, _MC),
  "glam_wsc": ("super_glue/wsc.fixed", "validation", "train", wsc, _MC),
  "glam_record": ("super_glue/record", "validation", "train", record, _MC),
  "glam_multirc": ("super_glue/multirc", "validation", "train", multirc, _MC),
  "glam_hellaswag": ("hellaswag", "validation", "train", hellaswag, _MC),
  "glam_piqa": ("piqa", "validation", "train", piqa, _MC),
  "glam_openbookqa": ("openbookqa", "test", "train", openbookqa, _MC),
  "glam_race_middle": ("race/middle", "test", "train", race, _MC),
  "glam_race_high": ("race/high", "test", "train", race, _MC),
  "glam_storycloze": ("story_cloze/2016", "test", "validation", story_cloze, _MC),
  "glam_winogrande": ("winogrande", "validation", "train_xl", winogrande, _MC),
  "glam_anli_r1": ("anli/r1", "test", "train", anli, _MC),
  "glam_anli_r2": ("anli/r2", "test", "train", anli, _MC),
  "glam_anli_r3": ("anli/r3", "test", "train", anli, _MC),
}


class GlamDataNotFoundError(prompts.FewShotError):
  """A suite dataset is not prepared in the TFDS data dir."""


def load_tfds_examples(
  tfds_name: str, split: str, data_dir: str | None = None
) -> list[dict[str, Any]]:
  """Examples of a prepared TFDS dataset as numpy dicts, in file order, without downloading."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    ds = tfds.load(
      tfds_name, split=split, data_dir=data_dir, download=False, shuffle_files=False, try_gcs=False
    )
  except Exception as e:  # pylint: disable=broad-except - tfds raises several types for "not here"
    raise GlamDataNotFoundError(
      f"TFDS dataset {tfds_name!r} (split {split!r}) is not available in "
      f"{data_dir or 'the default TFDS data dir'}: {e}\nPrepare it on a machine with the data "
      f"(tfds build {tfds_name.split('/')[0]} --data_dir=DIR) and point gin "
      f"glam_tfds_data_dir.data_dir (or ${GLAM_DATA_DIR_ENV}) at DIR."
    ) from e
  return list(tfds.as_numpy(ds))


def _loader(name: str) -> Callable[[str], tuple[FewShotExample, ...]]:
  tfds_name, _, demo_split, convert, _ = SUITE[name]

  @functools.lru_cache(maxsize=4)
  def cached(split: str, data_dir: str | None) -> tuple[FewShotExample, ...]:
    tfds_split = f"{split}[:{DEMO_CAP}]" if split == demo_split else split
    out: list[FewShotExample] = []
    for ex in load_tfds_examples(tfds_name, tfds_split, data_dir):
      out += convert(ex)
    return tuple(out)

  def load(split: str) -> tuple[FewShotExample, ...]:
    return cached(split, glam_tfds_data_dir())

  load.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
  return load


def _normalize_kind(name: str) -> dict[str, Any]:
  kind = SUITE[name][4]
  return {"max_decode_len": 24} if kind == _GEN else {"primary_metric": "accuracy"}


def register_suite() -> list[str]:
  """Registers every suite task (idempotent); touches no data."""
  for name, (tfds_name, eval_split, demo_split, _, kind) in SUITE.items():
    prompts.register(
      FewShotTask(
        name,
        kind,
        _loader(name),
        eval_split=eval_split,
        demo_split=demo_split,
        description=f"GLaM suite: {tfds_name}",
        **_normalize_kind(name),
      )
    )
  return list(SUITE)


def clear_caches() -> None:
  """Forgets loaded examples (e.g. after pointing the suite at another data dir)."""
  for name in SUITE:
    prompts.get_task(name).load.cache_clear()


register_suite()
