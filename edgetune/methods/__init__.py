"""The method registry: importing this package registers every method (one file each)."""
from edgetune.methods.base import (METHODS, CollapseGuard, Method, MethodConfig, TapSpec, declare, entropy,
                                   supervised_or)
from edgetune.methods import source, feature_align  # noqa: F401  (registration)

__all__ = ["METHODS", "CollapseGuard", "Method", "MethodConfig", "TapSpec", "declare", "entropy", "supervised_or"]
