"""Packaging for lifelong-moe-jax (Python 3.11).

Exact versions live in requirements.lock; the ranges here are what the code needs.
"""

from setuptools import find_packages, setup

setup(
  name="lifelong_moe_jax",
  version="0.1.0",
  description="Lifelong (continual) pretraining of Mixture-of-Experts language models in JAX/Flax.",
  python_requires=">=3.11,<3.12",
  packages=find_packages(include=["lifelong_moe_jax", "lifelong_moe_jax.*", "tasks", "tasks.*"]),
  package_data={"": ["*.gin"]},
  install_requires=[
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12,<0.13",
    "seqio==0.0.20",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10",
    "importlib_resources",  # imported by tfds 4.9.10 on Python 3.11 without being declared
    "clu>=0.0.12",
    "tensorboard>=2.21,<2.22",  # clu.metric_writers writes TensorBoard events through it
    "gin-config>=0.5",
    "sentencepiece>=0.2",
    "matplotlib>=3.8",
  ],
  extras_require={
    # Packages whose shipped files the default corpora are built from.
    "corpora": ["gensim==4.4.0", "chitchat-dataset==0.9.0"],
    "test": ["pytest>=8", "ruff==0.14.14"],
    # EleutherAI's lm-evaluation-harness (python -m lifelong_moe_jax.harness, docs/fewshot.md);
    # exact versions of its stack: requirements-harness.lock.
    "harness": ["lm-eval==0.4.13", "datasets==5.2.0"],
  },
)
