"""Deprecated: the lifelong methods moved to ``lifelong_moe_jax.lifelong.methods``.

This module re-exports the old names for one release; import ``methods`` instead.
"""

import warnings

from lifelong_moe_jax.lifelong.ewc_fisher import FISHER_DIR  # noqa: F401
from lifelong_moe_jax.lifelong.method_mixtures import (  # noqa: F401
  mixture_tasks,
  register_joint_mixture,
  register_replay_mixture,
)
from lifelong_moe_jax.lifelong.methods import (  # noqa: F401
  METHODS,
  Method,
  MethodError,
  MethodOptions,
  dense_config,
  dense_mlp_dim,
  describe,
  get_method,
  register_method,
)
from lifelong_moe_jax.lifelong.penalties import load_fisher, save_fisher  # noqa: F401

warnings.warn(
  "lifelong_moe_jax.lifelong.baselines is deprecated; use lifelong_moe_jax.lifelong.methods.",
  DeprecationWarning,
  stacklevel=2,
)
