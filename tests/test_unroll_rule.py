"""compilers/unroll.py's rule: small loops unrolled, except where TVM's C codegen would reuse a stale load."""
from __future__ import annotations

from tvm import te

from edgetune.compilers.unroll import unroll_small_loops


def _reduction(kind: str):
    a = te.placeholder((16, 16), "int32", name="a")
    k = te.reduce_axis((0, 16), "k")
    reduce = {"max": te.max, "min": te.min, "sum": te.sum}[kind]
    out = te.compute((16,), lambda i: reduce(a[i, k], axis=k), name="out")
    return te.create_prim_func([a, out])


def test_a_small_sum_is_unrolled():
    assert unroll_small_loops(_reduction("sum"))[1] >= 1


def test_a_running_max_or_min_stays_rolled():
    """Unrolled, ``m = max(m, x0); m = max(m, x1); ...`` is printed by TVM's C codegen with the first load
    of ``m`` reused in every statement (the MaxPool / Softmax C builds computed max(first, last))."""
    for kind in ("max", "min"):
        assert unroll_small_loops(_reduction(kind))[1] == 0, kind
