"""Host micro-kernels (``targets/host/et_kernels_x86.h``, routed by ``compilers/host_kernels.py``): the
AVX-512 VNNI path and the plain C path give the same bytes, both equal to a numpy model of onnxruntime's
integer arithmetic on awkward shapes (channel counts that fill no tile, pixel tails, stride 2, one input
channel), and the host library that calls them equals onnxruntime's integer session on the zoo's small
models, built either way."""
from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_tool
from edgetune.compilers import FrozenRunner, compile_frozen, host_kernels
from edgetune.compilers.schedule import family_of
from edgetune.targets import HOST_KERNELS_DIR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="x86-64 host micro-kernels")
PLAIN = ("-O2",)  # no -march: the x86-64 baseline, no AVX-512 macro, so the header's plain C path


def _library(tmp_path: Path, name: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    so = tmp_path / f"{name}.so"
    source = HOST_KERNELS_DIR / host_kernels.SOURCE
    subprocess.run(["gcc", *flags, "-fPIC", "-shared", f"-I{HOST_KERNELS_DIR}", str(source), "-o", str(so), "-lm"],
                   check=True)
    return ctypes.CDLL(str(so))


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict[str, ctypes.CDLL]:
    d = tmp_path_factory.mktemp("x86")
    libs = {"simd": _library(d, "simd", host_kernels.CFLAGS), "plain": _library(d, "plain", PLAIN)}
    dumps = {k: subprocess.run(["objdump", "-d", str(d / f"{k}.so")], capture_output=True, text=True).stdout
             for k in libs}
    assert "vpdpbusd" not in dumps["plain"]
    assert ("vpdpbusd" in dumps["simd"]) == host_kernels.vnni_available()
    return libs


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _requant(acc: np.ndarray, scale: np.ndarray, zy: int) -> np.ndarray:
    """onnxruntime's requantisation: float32(acc) * scale, clamped, rounded half to even, plus zy."""
    v = acc.astype(np.int32).astype(np.float32) * scale.astype(np.float32)
    return (np.rint(np.clip(v, np.float32(-128 - zy), np.float32(127 - zy))) + zy).astype(np.int8)


def _packed(w: np.ndarray, bias: np.ndarray, order: tuple[int, ...], blocked: bool) -> tuple[np.ndarray, np.ndarray]:
    r = host_kernels.Replaced(None, "", order, blocked)
    return host_kernels._packed(w, bias, r)


def _random_layer(rng, cin, cout, k):
    w = rng.integers(-127, 128, (cout, cin, k, k), dtype=np.int8)
    bias = rng.integers(-20000, 20000, cout).astype(np.int32)
    scale = rng.uniform(2e-4, 4e-3, cout).astype(np.float32)
    return w, bias, scale


@needs_tool("gcc", "objdump")
@pytest.mark.parametrize("cin, hw, cout", [(4, 16, 16), (8, 20, 24), (12, 7, 13), (64, 64, 40), (96, 16, 28)])
def test_pointwise_simd_and_plain_c_equal_the_reference(libraries, cin, hw, cout):
    rng = np.random.default_rng(cin * 1000 + hw + cout)
    x = rng.integers(-128, 128, (cin, hw), dtype=np.int8)
    w, bias, scale = _random_layer(rng, cin, cout, 1)
    zy = int(rng.integers(-20, 20))
    expected = _requant(w[:, :, 0, 0].astype(np.int64) @ x.astype(np.int64) + bias[:, None], scale[:, None], zy)
    wp, bp = _packed(w, bias, (0, 2, 3, 1), True)
    for name, lib in libraries.items():
        y = np.zeros((cout, hw), np.int8)
        status = lib.et_x86_pointwise_s8(_ptr(x), _ptr(wp), _ptr(bp), _ptr(scale), _ptr(y), cin, hw, cout, zy)
        assert status == 0
        assert np.array_equal(y, expected), f"{name}: {int((y != expected).sum())} of {y.size} outputs differ"


CONVS = [  # cin, h, wd, cout, (kh, kw), (sh, sw), (top, left)
    (1, 9, 9, 16, (3, 3), (1, 1), (1, 1)), (1, 32, 32, 16, (3, 3), (2, 2), (1, 1)),
    (3, 8, 6, 5, (3, 3), (2, 2), (1, 1)), (16, 16, 16, 32, (3, 3), (2, 2), (1, 1)),
    (8, 5, 7, 20, (3, 3), (1, 1), (1, 1)), (32, 4, 4, 48, (3, 3), (2, 2), (1, 1)),
    (4, 17, 33, 8, (3, 3), (1, 1), (1, 1)), (6, 1, 100, 16, (1, 5), (1, 1), (0, 2)),
    (16, 1, 100, 32, (1, 5), (1, 2), (0, 2)), (16, 8, 8, 24, (1, 1), (2, 2), (0, 0)),
    (5, 11, 10, 12, (3, 3), (3, 2), (0, 1)), (8, 12, 12, 8, (5, 5), (1, 1), (2, 2))]


@needs_tool("gcc", "objdump")
@pytest.mark.parametrize("cin, h, wd, cout, kernel, stride, pads", CONVS)
def test_conv_simd_and_plain_c_equal_the_reference(libraries, cin, h, wd, cout, kernel, stride, pads):
    rng = np.random.default_rng(cin * 7 + h * 13 + wd + cout + sum(stride) + sum(kernel))
    (kh, kw), (sh, sw), (top, left) = kernel, stride, pads
    x = rng.integers(-128, 128, (cin, h, wd), dtype=np.int8)
    w = rng.integers(-127, 128, (cout, cin, kh, kw), dtype=np.int8)
    bias = rng.integers(-20000, 20000, cout).astype(np.int32)
    scale = rng.uniform(2e-4, 4e-3, cout).astype(np.float32)
    zx, zy = int(rng.integers(-30, 30)), int(rng.integers(-20, 20))
    oh, ow = (h + 2 * top - kh) // sh + 1, (wd + 2 * left - kw) // sw + 1  # as much padding at the end
    padded = np.full((cin, h + 2 * top + sh, wd + 2 * left + sw), zx, np.int64)
    padded[:, top:top + h, left:left + wd] = x
    acc = np.zeros((cout, oh, ow), np.int64) + bias[:, None, None]
    for ry in range(kh):
        for rx in range(kw):
            window = padded[:, ry:ry + sh * (oh - 1) + 1:sh, rx:rx + sw * (ow - 1) + 1:sw]
            acc += np.einsum("oc,cij->oij", w[:, :, ry, rx].astype(np.int64), window)
    expected = _requant(acc, scale[:, None, None], zy)
    # TVM's channel-vector convs hand their weights over [I, H, W, O]: the same packing from there
    for order, weights in (((0, 2, 3, 1), w), ((3, 1, 2, 0), np.ascontiguousarray(w.transpose(1, 2, 3, 0)))):
        wp, bp = _packed(weights, bias, order, cin % 4 == 0)
        for name, lib in libraries.items():
            y = np.zeros((cout, oh, ow), np.int8)
            status = lib.et_x86_conv_s8(_ptr(x), _ptr(wp), _ptr(bp), _ptr(scale), _ptr(y), cin, h, wd, cout, oh, ow,
                                        kh, kw, sh, sw, top, left, zx, zy)
            assert status == 0
            assert np.array_equal(y, expected), f"{name}: {int((y != expected).sum())} of {y.size} outputs differ"


DEPTHWISE = [  # ch, h, wd, (kh, kw), (sh, sw), (top, left)
    (32, 16, 16, (3, 3), (1, 1), (1, 1)), (64, 16, 16, (3, 3), (2, 2), (1, 1)), (24, 8, 8, (3, 3), (2, 2), (1, 1)),
    (5, 4, 4, (3, 3), (1, 1), (1, 1)), (3, 9, 37, (3, 3), (2, 2), (1, 1)), (7, 20, 20, (5, 5), (1, 1), (2, 2)),
    (4, 12, 10, (5, 5), (2, 2), (2, 2)), (6, 7, 33, (3, 3), (1, 1), (1, 1)), (2, 10, 10, (3, 3), (3, 3), (0, 1))]


@needs_tool("gcc", "objdump")
@pytest.mark.parametrize("ch, h, wd, kernel, stride, pads", DEPTHWISE)
def test_depthwise_simd_and_plain_c_equal_the_reference(libraries, ch, h, wd, kernel, stride, pads):
    rng = np.random.default_rng(ch * 31 + h * 7 + wd + sum(kernel) + sum(stride))
    (kh, kw), (sh, sw), (top, left) = kernel, stride, pads
    x = rng.integers(-128, 128, (ch, h, wd), dtype=np.int8)
    w = rng.integers(-127, 128, (ch, 1, kh, kw), dtype=np.int8)
    bias = rng.integers(-20000, 20000, ch).astype(np.int32)
    scale = rng.uniform(2e-4, 4e-3, ch).astype(np.float32)
    zx, zy = int(rng.integers(-30, 30)), int(rng.integers(-20, 20))
    oh, ow = (h + 2 * top - kh) // sh + 1, (wd + 2 * left - kw) // sw + 1
    padded = np.full((ch, h + 2 * top + sh, wd + 2 * left + sw), zx, np.int64)
    padded[:, top:top + h, left:left + wd] = x
    acc = np.zeros((ch, oh, ow), np.int64) + bias[:, None, None]
    for ry in range(kh):
        for rx in range(kw):
            acc += w[:, 0, ry, rx, None, None] * padded[:, ry:ry + sh * (oh - 1) + 1:sh, rx:rx + sw * (ow - 1) + 1:sw]
    expected = _requant(acc, scale[:, None, None], zy)
    for name, lib in libraries.items():
        y = np.zeros((ch, oh, ow), np.int8)
        status = lib.et_x86_depthwise_s8(_ptr(x), _ptr(w), _ptr(bias), _ptr(scale), _ptr(y), ch, h, wd, oh, ow, kh, kw,
                                         sh, sw, top, left, zx, zy)
        assert status == 0
        assert np.array_equal(y, expected), f"{name}: {int((y != expected).sum())} of {y.size} outputs differ"


@needs_tool("gcc", "objdump")
@pytest.mark.parametrize("n", [1, 17, 4096])
def test_add_simd_and_plain_c_equal_the_reference(libraries, n):
    rng = np.random.default_rng(n)
    a, b = (rng.integers(-128, 128, n, dtype=np.int8) for _ in range(2))
    params = np.array([rng.uniform(0.3, 2.0), rng.uniform(0.3, 2.0), rng.uniform(-9.0, 9.0)], np.float32)
    # each float32 FMA is exact in float64 and rounded once (int8_math.add_is_exact holds for these)
    inner = (b.astype(np.float64) * float(params[1]) + float(params[2])).astype(np.float32)
    outer = (a.astype(np.float64) * float(params[0]) + inner.astype(np.float64)).astype(np.float32)
    expected = np.rint(np.clip(outer, -128, 127)).astype(np.int8)
    for name, lib in libraries.items():
        y = np.zeros(n, np.int8)
        assert lib.et_x86_add_s8(_ptr(params), _ptr(a), _ptr(b), _ptr(y), n) == 0
        assert np.array_equal(y, expected), f"{name}: {int((y != expected).sum())} of {n} outputs differ"


@needs_tool("gcc")
@pytest.mark.parametrize("model", ["tiny-cnn", "mcunet-s"])
def test_host_library_with_micro_kernels_is_bit_exact_either_way(model, tmp_path, monkeypatch):
    import bench_linux as bl
    from bench_kernels import frozen_model

    frozen, _ = frozen_model(model, tmp_path)
    x = bl.test_images(model, 4)
    ref = bl.session(frozen, True)
    expected = [ref.run(None, {"x": x[i:i + 1]}) for i in range(len(x))]
    shipped = compile_frozen(frozen, "host", tmp_path / "shipped")
    routed = [k for k in shipped.plan.kernels if "x86 micro-kernel" in k.schedule]
    assert bool(routed) == host_kernels.vnni_available()
    # the same routing with the header's plain C path: the fallback's bytes, on any x86-64 machine
    monkeypatch.setattr(host_kernels, "vnni_available", lambda cc="gcc": True)
    monkeypatch.setattr(host_kernels, "CFLAGS", PLAIN)
    plain = compile_frozen(frozen, "host", tmp_path / "plain")
    for k in plain.plan.kernels:  # every regular conv and every residual add of these models is covered
        if family_of(k.name) in ("qconv2d", "qconv2d_oc") or k.name.startswith("add"):
            assert "x86 micro-kernel" in k.schedule, k
    # and with the depthwise micro-kernel switched on (an attempt: exact, but slower than TVM's own)
    monkeypatch.setattr(host_kernels, "ROUTE_DEPTHWISE", True)
    depthwise = compile_frozen(frozen, "host", tmp_path / "depthwise")
    assert all("x86 micro-kernel" in k.schedule for k in depthwise.plan.kernels
               if family_of(k.name) == "qconv2d_depthwise")
    for graph in (shipped, plain, depthwise):
        runner = FrozenRunner(graph)
        for i in range(len(x)):
            for ours, theirs in zip(runner(x[i:i + 1]), expected[i]):
                assert np.array_equal(ours, theirs), f"{graph.out_dir.name}: image {i} differs"
