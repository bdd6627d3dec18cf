"""Lifelong-MoE in JAX/Flax; see docs/architecture.md for the package map."""

from lifelong_moe_jax import cli_startup as _cli_startup

_cli_startup.prepare_cli_process()  # only under ``python -m lifelong_moe_jax.<cli>``
