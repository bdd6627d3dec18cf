"""SeqIO tasks and mixtures over the lifelong pretraining distributions.

Tasks (decoder-only LM, one output feature `targets`, splits `train` / `validation`):

- `lifelong_wiki_en`, `lifelong_code_py`, `lifelong_dialog_en` (defaults) and `lifelong_fortunes_intl`
  (optional), read through TFDS (`lifelong_text/<dist>:1.0.0` materialised under `DIR/tfds`) with
  `LocalTextTfdsSource`, a `seqio.TfdsDataSource` whose data dir is resolved at dataset-build time;
- whatever `register_text_distribution` (Python) or `register_folder_distributions` (gin) adds;
- whatever `register_tfds_distribution` adds over an existing TFDS dataset (C4, wiki40b on a cluster).

The registration functions themselves (`register_text_distribution`, `register_tfds_distribution`,
`register_folder_distributions`, `register_mixture`, `task_name`, ...) live in
`lifelong_moe_jax.data.registration` and are re-exported here; this module holds the built-in
registrations and the gin face of `register_folder_distributions`. CLIs import this package through
`--tasks_module` (default `tasks`).

Preprocessing: rekey `text` -> `targets`, tokenize with the shared `LazyVocabulary`
(`vocab.shared_vocabulary()`: SentencePiece or byte, chosen by gin `get_vocabulary.kind`), append EOS,
cut documents into chunks of the target length (so no tokens are dropped by trimming). Packing happens
in the feature converter (see `lifelong_moe_jax.data.pipeline.get_dataset`).

Mixtures:
- `lifelong_all`: the default distributions at equal rates. This is the multitask baseline's data: the
  lifelong schedule gives every distribution a phase of the same step budget, so equal rates give the
  jointly trained baseline the same per-distribution share of tokens and the comparison isolates the
  effect of training order (forgetting) from data proportions. (The default builds are capped to
  similar sizes, ~3-4 MB each, so proportional rates would be nearly equal anyway.)
- `lifelong_all_by_size`: the same, rates proportional to each distribution's train text bytes.

Every registration replaces an earlier one of the same name, so calling these functions again (or
importing this module under another name) never fails on a duplicate.
"""

from __future__ import annotations

import gin

from lifelong_moe_jax.data import distributions
from lifelong_moe_jax.data import registration
from lifelong_moe_jax.data import tfds_builder
from lifelong_moe_jax.data import vocab

# The registration functions live in the library; re-exported so `tasks.register_text_distribution(...)`
# and `tasks.corpora.register_mixture(...)` keep working.
from lifelong_moe_jax.data.registration import (  # noqa: F401  pylint: disable=unused-import
  OUTPUT_FEATURES,
  TASK_PREFIX,
  register_mixture,
  register_text_distribution,
  register_tfds_distribution,
  task_name,
  text_preprocessors,
)

ALL_MIXTURE = "lifelong_all"
ALL_BY_SIZE_MIXTURE = "lifelong_all_by_size"

# The process-wide shared instance (also used by the few-shot tasks), so mixtures compare vocabularies
# by identity without resolving them at import.
VOCABULARY = vocab.shared_vocabulary()

# Gin face of the library function (the task module is the edge that gin sees): a .gin file alone can
# register folders,
#
#     register_folder_distributions.folders = {"legal": "/data/legal_txt"}
#     register_folder_distributions.mixtures = {"wiki_and_legal": ["wiki_en", "legal"]}
#
# and the data pipeline applies those bindings before it resolves a task name (deferred registration).
register_folder_distributions = gin.external_configurable(
  registration.register_folder_distributions, "register_folder_distributions", module=__name__
)
registration.add_deferred_registration(
  f"{__name__}.register_folder_distributions", register_folder_distributions
)


def register_builtin_tasks() -> None:
  """Registers the built-in distribution tasks and the `lifelong_all*` mixtures (idempotent)."""
  for dist in distributions.DEFAULT_DISTRIBUTIONS + distributions.OPTIONAL_DISTRIBUTIONS:
    registration.add_text_task(task_name(dist), tfds_builder.LocalTextTfdsSource(dist))
  register_mixture(ALL_MIXTURE, distributions.DEFAULT_DISTRIBUTIONS, rate="equal")
  register_mixture(ALL_BY_SIZE_MIXTURE, distributions.DEFAULT_DISTRIBUTIONS, rate="size")


register_builtin_tasks()
