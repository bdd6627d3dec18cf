"""SeqIO registrations of lifelong-moe-jax.

Import this package (as t5x imports its MIXTURE_OR_TASK_MODULE) to register every task and mixture:

    import tasks
    tasks.register_text_distribution("legal", folder="/data/legal")  # -> task "lifelong_legal"

The registration functions re-exported here live in ``lifelong_moe_jax.data.registration``; this
package only holds the project's own registrations. The CLIs import it by name through their
``--tasks_module`` flag (default ``tasks``); list your own module there to register more tasks.
See docs/data.md.
"""

from tasks import corpora
from tasks import fewshot  # embedded few-shot tasks (docs/fewshot.md)
from tasks import glam_suite  # the GLaM few-shot suite on TFDS catalog names (needs the data)
from tasks.corpora import (
  ALL_BY_SIZE_MIXTURE,
  ALL_MIXTURE,
  register_folder_distributions,
  register_mixture,
  register_text_distribution,
  register_tfds_distribution,
  task_name,
)

__all__ = [
  "ALL_BY_SIZE_MIXTURE",
  "ALL_MIXTURE",
  "corpora",
  "fewshot",
  "glam_suite",
  "register_folder_distributions",
  "register_mixture",
  "register_text_distribution",
  "register_tfds_distribution",
  "task_name",
]
