"""Embedded few-shot tasks: built from the prepared corpora and from files shipped in packages.

Nothing is downloaded. Importing this module registers every task in the few-shot registry
(``lifelong_moe_jax.eval.prompts``) and as a seqio task of the same name:

=========================  ==========  ==============================================  ========
task                       kind        data                                            chance
=========================  ==========  ==============================================  ========
fewshot_wiki_cloze         4-way MC    last word of held-out wiki_en sentences         25 %
fewshot_code_next_line     4-way MC    next line of held-out code_py files             25 %
fewshot_code_completion    generation  rest of a held-out code_py line after = or (     0 %
fewshot_dialog_response    4-way MC    next turn of held-out dialog_en conversations   25 %
fewshot_analogy            4-way MC    gensim questions-words.txt analogies            25 %
fewshot_polarity           2-way MC    gensim pang_lee_polarity.cor review snippets     50 %
fewshot_quiz (optional)    4-way MC    bsdgames quiz files (capitals, elements, ...)   25 %
=========================  ==========  ==============================================  ========

The corpus tasks query the *validation* split of the prepared distributions (never trained on) and
take demonstrations from their *train* split; the package-file tasks split their file 50/50 (polarity
per label, analogies 25/75) by a stable hash. Distractors are answers of other examples of the same
split, chosen by a generator seeded with the task name and the example. Examples come in a stable
pseudo-random order and are capped (``EVAL_CAP`` / ``DEMO_CAP``); see docs/fewshot.md for the prompt
formats and sizes. ``fewshot_quiz`` is registered only when the Debian package ``bsdgames`` is
installed (``QUIZ_DIRS``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from typing import Callable, Sequence

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import distributions
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.eval.prompts import FewShotExample, FewShotTask

EVAL_CAP = 500  # examples kept per eval split of a corpus task
DEMO_CAP = 2000  # examples kept per demonstration split
NUM_CHOICES = 4
CONTEXT_LINES = 6  # code lines before the target line
CONTEXT_TURNS = 4  # dialog turns before the target turn
QUIZ_DIRS = ("/usr/share/games/bsdgames/quiz", "/usr/share/games/quiz")


# ------------------------------------------------------------------------------- data access
def prepared_documents(distribution: str, split: str) -> list[str]:
  """Documents of a prepared distribution's split (data dir resolved now: flag / gin / env)."""
  root = data_dir_lib.resolve_data_dir()
  marker = distributions.ensure_built(distribution, root)
  paths = shards.split_files(data_dir_lib.distribution_dir(distribution, root), split, marker)
  return [text for _, _, text in shards.iter_documents(paths)]


def _cap(split: str) -> int:
  return DEMO_CAP if split == "train" else EVAL_CAP


def _package_file(package: str, *parts: str) -> str:
  """Path of a file shipped inside an installed package, without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise prompts.FewShotError(
      f"Package {package!r} is not installed; it ships the data of this "
      f"task (pip install -e '.[corpora]')."
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  if not os.path.exists(path):
    raise prompts.FewShotError(f"{path} is missing from the installed {package!r} package.")
  return path


def read_lines(path: str) -> list[str]:
  """Lines of a text file; lines that are not UTF-8 are read as cp1252 (gensim's polarity file)."""
  with open(path, "rb") as f:
    raw = f.read().split(b"\n")
  out = []
  for line in raw:
    try:
      out.append(line.decode("utf-8"))
    except UnicodeDecodeError:
      out.append(line.decode("cp1252", errors="replace"))
  return out


def _in_split(key: str, split: str, validation_share: int, buckets: int = 4) -> bool:
  """Stable hash split: ``validation_share`` of ``buckets`` hash buckets are validation."""
  is_validation = prompts.stable_seed("split", key) % buckets < validation_share
  if split == "validation":
    return is_validation
  if split == "train":
    return not is_validation
  raise prompts.FewShotError(f"Unknown split {split!r}; use 'train' or 'validation'.")


# ------------------------------------------------------------------------------- wiki_en cloze
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"^[A-Za-z]{4,}$")


def wiki_cloze_items(documents: Sequence[str]) -> list[tuple[str, str]]:
  """(context, last word) for every usable sentence: 8-40 words, ending in '.', last word
  alphabetic with >= 4 letters; the context is the previous sentence of the paragraph (if any)
  followed by the sentence without its last word."""
  items = []
  for doc in documents:
    for paragraph in doc.split("\n"):
      sentences = _SENTENCE_END.split(paragraph.strip())
      for i, sentence in enumerate(sentences):
        words = sentence.split()
        if not 8 <= len(words) <= 40 or not sentence.endswith("."):
          continue
        last = words[-1][:-1]
        if not _WORD.match(last):
          continue
        context = " ".join(words[:-1])
        if i > 0:
          context = sentences[i - 1].strip() + " " + context
        items.append((context, last))
  return items


def _pooled_choice(
  items: Sequence[tuple[str, str]], name: str, split: str, answer_prefix: str = ""
) -> list[FewShotExample]:
  """``NUM_CHOICES``-way questions from (context, answer) items, in the stable order of task
  ``fewshot_<name>``, capped; the distractors are answers of other items of the split, seeded by
  ``name`` and the context."""
  pool = [answer for _, answer in items]
  out = []
  for context, answer in prompts.stable_shuffle(items, f"fewshot_{name}", split)[: _cap(split)]:
    distractors = prompts.pick_distractors(answer, pool, NUM_CHOICES - 1, name, context)
    out.append(
      prompts.multiple_choice(
        context, answer_prefix + answer, [answer_prefix + d for d in distractors], name, context
      )
    )
  return out


def _wiki_cloze(split: str) -> list[FewShotExample]:
  return _pooled_choice(
    wiki_cloze_items(prepared_documents("wiki_en", split)), "wiki_cloze", split, answer_prefix=" "
  )


# ------------------------------------------------------------------------------- code_py
def _indent(line: str) -> str:
  return line[: len(line) - len(line.lstrip())]


def code_line_items(documents: Sequence[str]) -> list[tuple[str, str]]:
  """(previous ``CONTEXT_LINES`` lines joined with newlines + a final newline, target line) for lines
  with >= 12 non-blank characters that are not comments, at line index >= ``CONTEXT_LINES``."""
  items = []
  for doc in documents:
    lines = doc.split("\n")
    for i in range(CONTEXT_LINES, len(lines)):
      line = lines[i].rstrip()
      body = line.strip()
      if len(body) < 12 or body.startswith(("#", '"""', "'''")):
        continue
      items.append(("\n".join(lines[i - CONTEXT_LINES : i]) + "\n", line))
  return items


def _code_next_line(split: str) -> list[FewShotExample]:
  items = code_line_items(prepared_documents("code_py", split))
  by_indent: dict[str, list[str]] = {}
  for _, line in items:
    by_indent.setdefault(_indent(line), []).append(line)
  out = []
  for context, line in prompts.stable_shuffle(items, "fewshot_code_next_line", split):
    # Distractors share the target's indentation, so whitespace alone does not give it away.
    distractors = prompts.pick_distractors(
      line, by_indent[_indent(line)], NUM_CHOICES - 1, "code_next_line", context, line
    )
    if len(distractors) == NUM_CHOICES - 1:
      out.append(prompts.multiple_choice(context, line, distractors, "code_next_line", context))
    if len(out) == _cap(split):
      break
  return out


_COMPLETION_SPLIT = re.compile(r"[=(]")


def _code_completion(split: str) -> list[FewShotExample]:
  out = []
  items = code_line_items(prepared_documents("code_py", split))
  for context, line in prompts.stable_shuffle(items, "fewshot_code_completion", split):
    m = _COMPLETION_SPLIT.search(line)
    if m is None:
      continue
    head, rest = line[: m.end()], line[m.end() :]
    if len(rest.strip()) < 3:
      continue
    out.append(FewShotExample(prompt=context + head, answers=(rest,)))
    if len(out) == _cap(split):
      break
  return out


# ------------------------------------------------------------------------------- dialog_en
def dialog_items(documents: Sequence[str]) -> list[tuple[str, str]]:
  """(previous ``CONTEXT_TURNS`` turns, one per line, + a final newline, next turn) for turns of
  3-30 words with at least two turns before them."""
  items = []
  for doc in documents:
    turns = [t.strip() for t in doc.split("\n") if t.strip()]
    for i in range(2, len(turns)):
      if 3 <= len(turns[i].split()) <= 30:
        items.append(("\n".join(turns[max(0, i - CONTEXT_TURNS) : i]) + "\n", turns[i]))
  return items


def _dialog_response(split: str) -> list[FewShotExample]:
  return _pooled_choice(
    dialog_items(prepared_documents("dialog_en", split)), "dialog_response", split
  )


# ------------------------------------------------------------------------------- gensim files
def analogy_items() -> list[tuple[str, tuple[str, str, str, str]]]:
  """(section, (a, b, c, d)) for every line of gensim's questions-words.txt."""
  path = _package_file("gensim", "test", "test_data", "questions-words.txt")
  items, section = [], ""
  for line in read_lines(path):
    if line.startswith(":"):
      section = line[1:].strip()
    elif len(line.split()) == 4:
      items.append((section, tuple(line.split())))
  return items


@functools.lru_cache(maxsize=4)
def _analogy(split: str) -> tuple[FewShotExample, ...]:
  items = analogy_items()
  answers_by_section: dict[str, list[str]] = {}
  for section, (_, _, _, d) in items:
    answers_by_section.setdefault(section, []).append(d)
  chosen = [(s, q) for s, q in items if _in_split(" ".join(q), split, validation_share=1)]
  out = []
  for section, (a, b, c, d) in prompts.stable_shuffle(chosen, "fewshot_analogy", split)[
    : _cap(split)
  ]:
    distractors = prompts.pick_distractors(
      d, answers_by_section[section], NUM_CHOICES - 1, "analogy", a, b, c, exclude=(a, b, c)
    )
    out.append(
      prompts.multiple_choice(
        f"{a} is to {b} as {c} is to", " " + d, [" " + w for w in distractors], "analogy", a, b, c
      )
    )
  return tuple(out)


POLARITY_CHOICES = (" negative", " positive")


def polarity_items() -> list[tuple[str, int]]:
  """(sentence, label) from gensim's pang_lee_polarity.cor: lines ``__label__neg|pos <text>``."""
  path = _package_file("gensim", "test", "test_data", "pang_lee_polarity.cor")
  items = []
  for line in read_lines(path):
    label, _, text = line.strip().partition(" ")
    if label in ("__label__neg", "__label__pos") and text.strip():
      items.append((text.strip(), int(label == "__label__pos")))
  return items


@functools.lru_cache(maxsize=4)
def _polarity(split: str) -> tuple[FewShotExample, ...]:
  if split not in ("train", "validation"):
    raise prompts.FewShotError(f"Unknown split {split!r}; use 'train' or 'validation'.")
  chosen = []
  for label in (0, 1):  # per label: the first half (stable order) is validation
    texts = prompts.stable_shuffle(
      [t for t, l in polarity_items() if l == label], "polarity", label
    )
    half = len(texts) // 2
    chosen += [(t, label) for t in (texts[:half] if split == "validation" else texts[half:])]
  return tuple(
    FewShotExample(prompt=f"Review: {text}\nSentiment:", choices=POLARITY_CHOICES, correct=(label,))
    for text, label in prompts.stable_shuffle(chosen, "fewshot_polarity", split)
  )


# ------------------------------------------------------------------------------- bsdgames quiz
# file -> (question field, answer field, prompt template)
QUIZ_FILES = {
  "africa": (0, 1, "Q: What is the capital of {}?\nA:"),
  "america": (0, 1, "Q: What is the capital of {}?\nA:"),
  "asia": (0, 1, "Q: What is the capital of {}?\nA:"),
  "europe": (0, 1, "Q: What is the capital of {}?\nA:"),
  "province": (0, 1, "Q: What is the capital of {}?\nA:"),
  "state": (0, 1, "Q: What is the capital of {}?\nA:"),
  "elements": (0, 3, "Q: Which chemical element has the symbol {}?\nA:"),
  "sexes": (0, 1, "Q: What is the female counterpart of \"{}\"?\nA:"),
  "collectives": (0, 1, "Q: What is the collective noun for {}?\nA:"),
}


def quiz_dir() -> str | None:
  """The installed bsdgames quiz folder, or None."""
  return next((d for d in QUIZ_DIRS if os.path.isfile(os.path.join(d, "africa"))), None)


def expand_quiz_pattern(text: str, limit: int = 64) -> list[str]:
  """All strings a bsdgames quiz pattern accepts, preferred form first.

  Grammar: ``a|b`` alternatives, ``{x}`` optional (tried with ``x`` first), ``[a|b]`` grouped
  alternatives, ``\\c`` a literal character. ``{G{eorge} }Washington`` -> ``George Washington``,
  ``G Washington``, ``Washington``.
  """

  def seq(i: int, stop: str) -> tuple[list[str], int]:
    out = [""]
    while i < len(text) and text[i] not in stop:
      c = text[i]
      if c == "\\" and i + 1 < len(text):
        options, i = [text[i + 1]], i + 2
      elif c in "{[":
        options, i = alts(i + 1, "}" if c == "{" else "]")
        if c == "{":
          options = options + [""]
        i += 1  # closing bracket
      else:
        options, i = [c], i + 1
      out = [o + p for o in out for p in options][:limit]
    return out, i

  def alts(i: int, close: str) -> tuple[list[str], int]:
    options: list[str] = []
    while True:
      part, i = seq(i, close + "|")
      options += part
      if i < len(text) and text[i] == "|":
        i += 1
        continue
      return options, i

  expanded, _ = alts(0, "")
  return list(dict.fromkeys(" ".join(e.split()) for e in expanded if e.strip()))[:limit]


def _split_quiz_fields(line: str) -> list[str]:
  """Splits a quiz line on ':' outside brackets (a backslash escapes the next character)."""
  fields, depth, current, i = [], 0, "", 0
  while i < len(line):
    c = line[i]
    if c == "\\" and i + 1 < len(line):
      current += line[i : i + 2]
      i += 2
      continue
    depth += c in "{[" and 1 or 0
    depth -= c in "}]" and 1 or 0
    if c == ":" and depth == 0:
      fields.append(current)
      current = ""
    else:
      current += c
    i += 1
  return fields + [current]


def quiz_items(directory: str) -> list[tuple[str, str, str]]:
  """(file, question, answer) in preferred form for every line of the ``QUIZ_FILES``."""
  items = []
  for name, (q_field, a_field, _) in sorted(QUIZ_FILES.items()):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    text = "\n".join(read_lines(path)).replace("\\\n", "")
    for line in text.split("\n"):
      fields = _split_quiz_fields(line.strip())
      if len(fields) <= max(q_field, a_field):
        continue
      question, answer = expand_quiz_pattern(fields[q_field]), expand_quiz_pattern(fields[a_field])
      if question and answer:
        items.append((name, question[0], answer[0]))
  # A question asked twice (Georgia: country and state; countries listed on two continents) is
  # kept once, with its first answer, so no query is also a demonstration.
  seen: set[tuple[str, str]] = set()
  unique = []
  for name, question, answer in items:
    key = (QUIZ_FILES[name][2], question)
    if key not in seen:
      seen.add(key)
      unique.append((name, question, answer))
  return unique


@functools.lru_cache(maxsize=4)
def _quiz(split: str) -> tuple[FewShotExample, ...]:
  directory = quiz_dir()
  if directory is None:
    raise prompts.FewShotError(
      "fewshot_quiz needs the bsdgames quiz files: apt-get install bsdgames."
    )
  items = quiz_items(directory)
  answers_by_file: dict[str, list[str]] = {}
  for name, _, answer in items:
    answers_by_file.setdefault(name, []).append(answer)
  chosen = [it for it in items if _in_split(it[1], split, validation_share=2)]
  out = []
  for name, question, answer in prompts.stable_shuffle(chosen, "fewshot_quiz", split):
    distractors = prompts.pick_distractors(
      answer, answers_by_file[name], NUM_CHOICES - 1, "quiz", name, question
    )
    out.append(
      prompts.multiple_choice(
        QUIZ_FILES[name][2].format(question),
        " " + answer,
        [" " + d for d in distractors],
        "quiz",
        name,
        question,
      )
    )
  return tuple(out)


# ------------------------------------------------------------------------------- registration
def _corpus_task_loader(distribution: str, build: Callable[[str], list[FewShotExample]]):
  """Loader for a corpus task, cached per (split, data dir, distribution build)."""

  @functools.lru_cache(maxsize=8)
  def cached(split: str, root: str, fingerprint: str) -> tuple[FewShotExample, ...]:
    del root, fingerprint
    return tuple(build(split))

  def load(split: str) -> tuple[FewShotExample, ...]:
    if split not in ("train", "validation"):
      raise prompts.FewShotError(f"Unknown split {split!r}; use 'train' or 'validation'.")
    root = data_dir_lib.resolve_data_dir()
    marker = distributions.ensure_built(distribution, root)  # raises with the prepare command
    return cached(split, root, json.dumps(marker, sort_keys=True))

  return load


def _always_available() -> bool:
  """Corpus tasks check their prepared data when loaded (raising with the prepare command), and the
  gensim files come with the ``corpora`` extra: they are always in the default list."""
  return True


def _quiz_available() -> bool:
  return quiz_dir() is not None


EMBEDDED_TASKS: tuple[FewShotTask, ...] = (
  FewShotTask(
    "fewshot_wiki_cloze",
    prompts.MULTIPLE_CHOICE,
    _corpus_task_loader("wiki_en", _wiki_cloze),
    is_available=_always_available,
    description="Last word of a held-out wiki_en sentence (previous sentence as context), 4-way.",
  ),
  FewShotTask(
    "fewshot_code_next_line",
    prompts.MULTIPLE_CHOICE,
    _corpus_task_loader("code_py", _code_next_line),
    is_available=_always_available,
    description="Next line of held-out Python (6 lines of context), 4 candidates of equal indent.",
  ),
  FewShotTask(
    "fewshot_code_completion",
    prompts.GENERATION,
    _corpus_task_loader("code_py", _code_completion),
    normalize="code",
    max_decode_len=24,
    is_available=_always_available,
    description="Rest of a held-out Python line after its first '=' or '(' (greedy, 24 tokens).",
  ),
  FewShotTask(
    "fewshot_dialog_response",
    prompts.MULTIPLE_CHOICE,
    _corpus_task_loader("dialog_en", _dialog_response),
    primary_metric="accuracy_norm",
    is_available=_always_available,
    description="Next turn of a held-out dialog_en conversation (4 turns of context), 4-way.",
  ),
  FewShotTask(
    "fewshot_analogy",
    prompts.MULTIPLE_CHOICE,
    _analogy,
    is_available=_always_available,
    description="'a is to b as c is to' -> d from gensim's questions-words.txt, 4-way.",
  ),
  FewShotTask(
    "fewshot_polarity",
    prompts.MULTIPLE_CHOICE,
    _polarity,
    is_available=_always_available,
    description="Sentiment of a movie-review snippet (gensim pang_lee_polarity.cor), 2-way.",
  ),
)
QUIZ_TASK = FewShotTask(
  "fewshot_quiz",
  prompts.MULTIPLE_CHOICE,
  _quiz,
  is_available=_quiz_available,
  description="bsdgames quiz questions (capitals, chemical elements, ...), 4-way.",
)


def available_tasks() -> list[str]:
  """Names of the embedded tasks whose data is present (fewshot_quiz needs bsdgames).

  The library sees the same list through ``FewShotTask.is_available``
  (``prompts.available_tasks()``, the default of ``run_fewshot``).
  """
  return [t.name for t in EMBEDDED_TASKS] + ([QUIZ_TASK.name] if quiz_dir() else [])


def register_embedded_tasks() -> list[str]:
  """Registers the embedded tasks (idempotent); returns their names."""
  for task in EMBEDDED_TASKS:
    prompts.register(task)
  if quiz_dir():
    prompts.register(QUIZ_TASK)
  return available_tasks()


register_embedded_tasks()
