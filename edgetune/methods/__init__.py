"""The method registry: importing this package registers every method (one file each)."""
from edgetune.methods.base import (METHODS, CollapseGuard, Method, MethodConfig, TapSpec, declare, entropy,
                                   supervised_or)
# Import order is registration order, which is the order `edgetune list methods` shows.
from edgetune.methods import source, bn_adapt, alpha_bn, tent, feature_align, tinytta, lst, vqt  # noqa: F401
from edgetune.methods import norm_align  # noqa: F401  (per-layer alignment inside the int8 backbone)
from edgetune.methods import full_finetune, last_layer, bias_only  # noqa: F401  (label-learning baselines)

__all__ = ["METHODS", "CollapseGuard", "Method", "MethodConfig", "TapSpec", "declare", "entropy", "supervised_or"]
