"""The collapse guard's restore for a model whose adapted state is statistics (norm-align), on the host runtime.

The C runtime restores a snapshot of trainable weights on a collapse; norm-align has none, its state is
running statistics and the requantisation folded from them. ``et_runtime_set_restore`` gives the runtime
the generated model's reset instead: a trip sends the whole state back to the bundle's values (the source
statistics, the identity fold), which is what the torch method and the integer reference do
(``methods.norm_align.RestoresSource``, ``int8ref.Int8NormAlign``).

Bundles that declare it (manifest ``runtime.guard.restore = "source"``) need none of this: their generated
model defines ``edgetune_model_restore_source``, which ``et_runtime_init`` links, in every app. This hook is
the fallback for norm-align bundles written before that field (they read as ``"weights"``).
"""
from __future__ import annotations

import ctypes

from edgetune import cruntime as cr


def restore_source_on_collapse(host) -> None:
    """Make ``host`` (a ``deploy.host.HostModel``)'s current runtime restore the bundle's state on a guard trip.
    ``HostModel.reset`` starts a new runtime: call again after each reset.

    Raises:
        ConfigError: the runtime refused the hook (status E_ARG: not initialised).
    """
    fn = host.lib.et_runtime_set_restore
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    reset = ctypes.cast(host.lib.edgetune_model_reset, ctypes.c_void_p)
    cr.check(fn(ctypes.addressof(host.runtime._rt), reset), "et_runtime_set_restore")


__all__ = ["restore_source_on_collapse"]
