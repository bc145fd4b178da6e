"""One exception hierarchy for everything edgetune reports to a user.

Messages follow the shape ``component: what is wrong (observed value); how to fix``.
The CLI prints ``str(error)`` on one line and exits 1; a traceback only with ``--debug``.
"""
from __future__ import annotations


class EdgetuneError(Exception):
    """Base of every error edgetune raises on purpose."""


class ConfigError(EdgetuneError):
    """A name, option or configuration value is invalid."""


class DataError(EdgetuneError):
    """A dataset is missing or a sample is malformed (shape, dtype, NaN/Inf)."""


class ModelError(EdgetuneError):
    """A model cannot be built, loaded or partitioned."""


class CheckpointError(EdgetuneError):
    """A checkpoint or bundle file is missing, corrupt or from another version."""


class ExportError(EdgetuneError):
    """An ONNX graph is malformed, uses unsupported ops or has dynamic shapes."""


class CompileError(EdgetuneError):
    """A graph cannot be lowered by a compiler (unsupported op, int8 pattern, shape)."""


class BudgetError(EdgetuneError):
    """A bundle does not fit the target's SRAM or flash budget."""


class ToolchainError(EdgetuneError):
    """An external tool (cross compiler, QEMU) is missing or failed."""
