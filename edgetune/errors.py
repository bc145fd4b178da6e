"""One exception hierarchy for everything edgetune reports to a user.

Messages follow the shape ``component: what is wrong (observed value); how to fix``.
The CLI prints ``edgetune: error: <message>`` on one line and exits with the class's
``exit_code`` (``EXIT_CODES`` lists them; 2 is argparse's usage error); a traceback only with
``--debug`` or ``EDGETUNE_DEBUG=1``.
"""
from __future__ import annotations


class EdgetuneError(Exception):
    """Base of every error edgetune raises on purpose."""

    exit_code = 1


class ConfigError(EdgetuneError):
    """A name, option or configuration value is invalid."""

    exit_code = 1


class DataError(EdgetuneError):
    """A dataset is missing or a sample is malformed (shape, dtype, NaN/Inf)."""

    exit_code = 3


class ModelError(EdgetuneError):
    """A model cannot be built, loaded or partitioned."""

    exit_code = 4


class CheckpointError(EdgetuneError):
    """A checkpoint or bundle file is missing, corrupt or from another version."""

    exit_code = 5


class ExportError(EdgetuneError):
    """An ONNX graph is malformed, uses unsupported ops or has dynamic shapes."""

    exit_code = 6


class CompileError(EdgetuneError):
    """A graph cannot be lowered by a compiler (unsupported op, int8 pattern, shape)."""

    exit_code = 7


class BudgetError(EdgetuneError):
    """A bundle does not fit the target's SRAM or flash budget."""

    exit_code = 8


class ToolchainError(EdgetuneError):
    """An external tool (cross compiler, QEMU) is missing or failed."""

    exit_code = 9


# Not an EdgetuneError: an exception edgetune did not raise on purpose is a bug (sysexits' EX_SOFTWARE).
BUG_EXIT_CODE = 70
USAGE_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130

EXIT_CODES: dict[int, str] = {
    ConfigError.exit_code: "a name, option or value is invalid (ConfigError)",
    USAGE_EXIT_CODE: "usage: the command line does not parse",
    DataError.exit_code: "data missing or malformed (DataError)",
    ModelError.exit_code: "the model cannot be built, loaded or partitioned (ModelError)",
    CheckpointError.exit_code: "a checkpoint or bundle file is missing or corrupt (CheckpointError)",
    ExportError.exit_code: "the graph cannot be exported (ExportError)",
    CompileError.exit_code: "the graph cannot be compiled (CompileError)",
    BudgetError.exit_code: "the model does not fit the target's memory (BudgetError)",
    ToolchainError.exit_code: "an external tool is missing or failed (ToolchainError)",
    BUG_EXIT_CODE: "an internal error (a bug in edgetune; please report it with the --debug traceback)",
    INTERRUPTED_EXIT_CODE: "interrupted (Ctrl-C)",
}
