"""``python -m lifelong_moe_jax.harness``: lm-evaluation-harness on a checkpoint (see ``__main__``).

A CLI package (the library model lives in ``lifelong_moe_jax.eval.harness``); nothing here is
imported by the library.
"""
