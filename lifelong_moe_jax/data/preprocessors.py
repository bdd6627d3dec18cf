"""seqio preprocessors for language-model pretraining on whole documents."""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf


def split_tokens_to_length(
  dataset: tf.data.Dataset,
  sequence_length: Mapping[str, int] | None = None,
  output_features: Mapping[str, seqio.Feature] | None = None,
  feature_key: str = "targets",
) -> tf.data.Dataset:
  """Cuts each tokenized document into consecutive chunks of at most `sequence_length[feature_key]`.

  Without it, seqio would trim every document to the sequence length and drop the rest of its tokens.
  Run it after tokenization (and after appending EOS, which then ends the document's last chunk).

  Args:
    dataset: examples with an int32 `feature_key` tensor of shape [num_tokens].
    sequence_length: feature lengths; when None or missing the key, the dataset is returned unchanged.
    output_features: unused (seqio passes it).
    feature_key: which feature to split.

  Returns:
    A dataset of `{feature_key: int32 [<= length]}` examples (other features are dropped, since
    they would no longer describe a chunk).
  """
  del output_features
  if not sequence_length or sequence_length.get(feature_key) is None:
    return dataset
  length = tf.constant(int(sequence_length[feature_key]), tf.int64)

  def chunks(example):
    tokens = example[feature_key]
    num_chunks = (tf.size(tokens, out_type=tf.int64) + length - 1) // length
    return tf.data.Dataset.range(num_chunks).map(
      lambda i: {feature_key: tokens[i * length : (i + 1) * length]}
    )

  return dataset.flat_map(chunks)
