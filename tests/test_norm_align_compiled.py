"""norm-align in the compiled runtimes: the bundle (manifest section, state, step), the int8 lowering
whose aligned convs take their requantisation as inputs and return their accumulator statistics,
and the host C runtime against the integer reference (``edgetune.int8ref``), per sample.
Small: the digits mcunet-s, a few samples; the 300-sample device runs are in the benchmark."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import needs_tool

from edgetune.adapt import fit, prepare
from edgetune.data import build_stream, to_tensor
from edgetune.errors import CheckpointError, ExportError
from edgetune.export import export, load_manifest
from edgetune.export.norm_align import CALIBRATION_IMAGES
from edgetune.int8ref.norm_align_int8 import Int8NormAlign, fold_affine
from edgetune.int8ref.qdq_model import QDQModel
from edgetune.methods.norm_align import standardising_affine, update_statistics
from edgetune.methods.norm_align_gate import gated, global_strength, noise_weight

SAMPLES = 24


@pytest.fixture(scope="module")
def fitted(mcunet, digits):
    adaptable = prepare(copy.deepcopy(mcunet[0]), "norm-align", {}, model_name="mcunet-s")
    fit(adaptable, digits, progress=False, use_cache=False)
    return adaptable


@pytest.fixture(scope="module")
def bundle(fitted, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("na-bundle") / "bundle"
    export(fitted, digits, out, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(fitted, digits, bundle) -> Int8NormAlign:
    """The integer reference on the bundle's own int8 graph, calibrated as export calibrates (reset per test)."""
    ref = Int8NormAlign(copy.deepcopy(fitted.method), QDQModel(bundle / "frozen.onnx"))
    ref.calibrate(digits.train_x[:CALIBRATION_IMAGES])
    return ref


def _stream(digits):
    return to_tensor(build_stream(digits, ("gaussian_noise",), 5, "episodic", 0, SAMPLES)[0].images)


def test_manifest_names_the_aligned_convs_and_is_sealed(fitted, bundle):
    manifest = load_manifest(bundle)
    na = manifest.norm_align
    aligned = [m.conv_index for m in fitted.method.aligned if m.conv_index >= 0]
    assert na is not None and [a.conv for a in na.convs] == aligned and not na.include_sample
    assert all(len(a.source_mean) == a.channels == len(a.requant) and a.positions > 0 for a in na.convs)
    inputs = {i.name: i.role for i in manifest.trainable.inputs}
    assert all(inputs[a.scale] == inputs[a.offset] == "state" and inputs[a.sum] == inputs[a.sumsq] == "tap"
               for a in na.convs)
    state = np.load(bundle / "initial_state.npz")
    for a in na.convs:  # reset point: source statistics, identity fold
        assert np.array_equal(state[a.scale], np.asarray(a.requant, np.float32))
        assert not state[a.offset].any()
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["norm_align"]["convs"][0]["source_mean"][0] += 1.0
    (bundle / "manifest.json").write_text(json.dumps(raw))
    try:
        with pytest.raises(CheckpointError, match="does not match its digest"):
            load_manifest(bundle)
    finally:
        (bundle / "manifest.json").write_text(manifest.to_json())
    assert load_manifest(bundle) == manifest


@pytest.mark.parametrize("overrides, what", [({"include_sample": "true"}, "include_sample=true"),
                                             ({"layers": "stages"}, "layers='stages'")])
def test_export_refuses_orders_the_kernel_cannot_run(mcunet, digits, tmp_path, overrides, what):
    adaptable = prepare(copy.deepcopy(mcunet[0]), "norm-align", overrides, model_name="mcunet-s")
    with pytest.raises(ExportError, match=f"norm-align cannot run compiled with {what}"):
        export(adaptable, digits, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_aligned_kernels_equal_the_integer_reference(bundle, digits):
    """Given the same folds, the compiled host graph's statistics are the reference accumulators' sums
    bit for bit (float32 of exact int64 sums: any int8 difference upstream would show), and its pooled
    output is the reference's."""
    import tvm
    from tvm import relax

    from edgetune.compilers.frozen import lower_frozen
    from edgetune.compilers.pipeline import build_vm

    na = load_manifest(bundle).norm_align
    qdq = QDQModel(bundle / "frozen.onnx")
    target = tvm.target.Target("llvm")
    low = lower_frozen(bundle / "frozen.onnx", target, "host", aligned=na.convs)
    described = [f.attrs["edgetune.schedule"] for gv, f in low.module.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and "qconv2d" in gv.name_hint]
    assert sum("channel moments per tile" in d for d in described) == len(na.convs)
    assert not any(d.startswith("unscheduled") for d in described)
    vm = relax.VirtualMachine(build_vm(low.module, target), tvm.cpu())
    g = torch.Generator().manual_seed(0)
    folds = {}
    for a in na.convs:  # gains 0.6..1.6 and offsets of tens of accumulator units
        gain = torch.exp(torch.empty(a.channels).uniform_(-0.5, 0.5, generator=g))
        folds[a.conv] = fold_affine(gain, torch.randn(a.channels, generator=g, dtype=torch.float64) * 40 *
                                    torch.tensor(a.accum_scale, dtype=torch.float64) * gain,
                                    torch.tensor(a.accum_scale))
    x = _stream(digits)[:3]
    moved = 0
    for i in range(len(x)):
        moments = {}

        def hook(k, acc, moments=moments):
            if k in folds:
                moments[k] = (acc.sum((2, 3))[0].float(), (acc * acc).sum((2, 3))[0].float())
                return folds[k]
            return None

        pooled, _ = qdq.run(x[i:i + 1], hook)
        args = [tvm.runtime.tensor(x[i:i + 1].numpy())]
        for a in na.convs:
            scale, offset = folds[a.conv]
            args += [tvm.runtime.tensor((qdq.convs[a.conv].requant * scale).float().numpy()),
                     tvm.runtime.tensor(offset.float().numpy())]
        outs = [o.numpy() for o in vm["main"](*args)]
        np.testing.assert_allclose(outs[0], pooled.numpy(), rtol=0, atol=1e-6)
        for j, a in enumerate(na.convs):
            assert np.array_equal(outs[1 + 2 * j][0], moments[a.conv][0].numpy()), (i, a.conv)
            assert np.array_equal(outs[2 + 2 * j][0], moments[a.conv][1].numpy()), (i, a.conv)
        moved += int(np.abs(outs[0] - qdq.run(x[i:i + 1])[0].numpy()).max() > 1e-3)
    assert moved == len(x)  # the folds did change the network's output


@pytest.fixture(scope="module")
def host(bundle, tmp_path_factory):
    from edgetune.deploy.host import HostModel
    return HostModel(bundle, workdir=tmp_path_factory.mktemp("na-host"))


def _close(got: np.ndarray, want: torch.Tensor, scale: torch.Tensor) -> float:
    """Worst error of a running statistic relative to its channel's scale (the root of E[y^2]): a mean
    near zero has no relative error of its own."""
    w = want.numpy()
    return float((np.abs(got.astype(np.float64) - w) / np.maximum(np.abs(w), np.sqrt(scale.numpy()))).max())


def test_host_runtime_predicts_as_the_integer_reference(reference, digits, host):
    """Free-running, each side folding its own statistics (the reference in float64): same predictions."""
    ref = reference
    ref.reset()
    x = _stream(digits)
    host.reset()
    assert [host.step(x[i].numpy()).prediction for i in range(SAMPLES)] == \
        [int(ref.step(x[i:i + 1]).argmax()) for i in range(SAMPLES)]


def test_host_step_equals_the_reference_given_its_folds(reference, digits, bundle, host):
    """Per sample, the reference driven with the device's own folds (scale, offset) and shift-gate strength
    computes the same integers (so the same prediction), its float64 update of the statistics from those
    accumulators is the device's within 1e-5 (relative to each channel's scale), the device's gate is the
    float64 gate of its statistics within 1e-5, and the device's next fold is the float64 gated fold of its
    statistics: scale within 1e-5 relative, offset within one accumulator unit (a float32 quotient next to a
    rounding tie)."""
    ref = reference
    ref.reset()
    na = load_manifest(bundle).norm_align
    qdq = QDQModel(bundle / "frozen.onnx")
    # the aligned convs' scale S' is fed whole: their exported S becomes 1 (fl32(1 * S') = S')
    unit = {id(qdq.convs[a.conv]): dataclasses.replace(qdq.convs[a.conv], requant=torch.ones(a.channels))
            for a in na.convs}
    qdq.ops = [unit.get(id(op), op) for op in qdq.ops]
    slots = {a.conv: slot for slot, a in enumerate(na.convs)}
    x = _stream(digits)
    host.reset()
    method = ref.method
    worst = {"statistics": 0.0, "scale": 0.0, "offset": 0.0, "gate": 0.0}
    gates = []
    for i in range(SAMPLES):
        before = host.state()
        assert i > 0 or (before["state_gate"][0] == 0.0 and before["state_gate_w"][0] == 0.0)
        momentum = torch.tensor(method.momentum_now(), dtype=torch.float64)
        moments = {}

        def driven(k, acc, before=before, moments=moments):
            if k not in slots:
                return None
            moments[slots[k]] = acc
            return tuple(torch.from_numpy(before[f"state_{s}{slots[k]}"]) for s in ("scale", "offset"))

        pooled, _ = qdq.run(x[i:i + 1], driven)
        logits = method.classify(pooled, momentum.float(), torch.from_numpy(before["state_gate"]))
        method.steps += 1
        assert host.step(x[i].numpy()).prediction == int(logits.argmax()), i
        after = host.state()
        w2 = noise_weight(torch.from_numpy(before["state_gate_w"]).double(), momentum)
        assert abs(float(after["state_gate_w"][0]) / float(w2) - 1) < 1e-6
        stats = [tuple(torch.from_numpy(after[f"state_{s}{slot}"]).double() for s in ("mean", "sqmean"))
                 for slot in range(len(na.convs))]
        strength = global_strength(stats, ref.source, ref.spread, torch.from_numpy(after["state_gate_w"]).double(),
                                   method.config.gate_level)
        worst["gate"] = max(worst["gate"], abs(float(after["state_gate"][0]) - float(strength)))
        gates.append(float(strength))
        for slot, a in enumerate(na.convs):
            y = moments[slot] * torch.tensor(a.accum_scale, dtype=torch.float64)[None, :, None, None]
            mean, sqmean = update_statistics(torch.from_numpy(before[f"state_mean{slot}"]).double(),
                                             torch.from_numpy(before[f"state_sqmean{slot}"]).double(), y, momentum)
            worst["statistics"] = max(worst["statistics"], _close(after[f"state_mean{slot}"], mean, sqmean),
                                      _close(after[f"state_sqmean{slot}"], sqmean, sqmean))
            src = (torch.tensor(a.source_mean, dtype=torch.float64), torch.tensor(a.source_sqmean, dtype=torch.float64))
            gain, shift = gated(*standardising_affine(*stats[slot], *src), strength)
            factor, offset = fold_affine(gain, shift, torch.tensor(a.accum_scale))
            scale = (torch.tensor(a.requant) * factor).float().numpy()
            worst["scale"] = max(worst["scale"], float(np.abs(after[f"state_scale{slot}"] / scale - 1).max()))
            worst["offset"] = max(worst["offset"], float(np.abs(after[f"state_offset{slot}"] - offset.numpy()).max()))
    assert worst["statistics"] < 1e-5 and worst["scale"] < 1e-5 and worst["offset"] <= 1, worst
    assert worst["gate"] < 1e-5 and max(gates) > 0.0, (worst, gates)  # the gate opened (closed at reset)


def test_reset_and_checkpoint_cover_the_state(bundle, host, digits):
    from edgetune import cruntime as cr

    x = _stream(digits)
    host.reset()
    source = host.state()
    first = [host.step(x[i].numpy()).prediction for i in range(SAMPLES)]
    adapted = host.state()
    assert any(not np.array_equal(adapted[n], source[n]) for n in source if "scale" in n or "offset" in n)
    # a revealed label (momentum 0) leaves a statistics-only model's state as it is, bit for bit: the step
    # writes its state in place (no scratch copy), which is sound only because of that
    host.feedback(x[0].numpy(), 3)
    assert all(np.array_equal(host.state()[n], adapted[n]) for n in adapted)
    region = bytearray(2 * cr.slot_bytes(host.runtime.payload_bytes()))
    ckpt = cr.Checkpoint.memory(host.lib, region, cr.slot_bytes(host.runtime.payload_bytes()))
    host.runtime.save(ckpt)
    after = [host.step(x[i].numpy()).prediction for i in range(SAMPLES)]
    host.reset()
    assert all(np.array_equal(host.state()[n], source[n]) for n in source)
    assert [host.step(x[i].numpy()).prediction for i in range(SAMPLES)] == first  # reset = source
    host.reset()
    assert host.runtime.boot(ckpt) is not None
    assert all(np.array_equal(host.state()[n], adapted[n]) for n in adapted)
    assert [host.step(x[i].numpy()).prediction for i in range(SAMPLES)] == after  # resumed, not restarted


def _device_equals_host(bundle, host, target: str, directory) -> None:
    """The bundle's firmware / program for ``target`` in its simulator: the host build's predictions, and its
    final statistics and folds bit for bit; the class prior within 1e-6 (it comes from a softmax: newlib's,
    glibc's and LLVM's ``expf`` and the classifier's matmul may round an ulp apart)."""
    from edgetune.deploy import write_target_project
    from edgetune.simulate import simulate, stream_samples

    project = write_target_project(bundle, target, out_dir=directory / target)
    report = simulate(project.directory, data="digits", corruption="gaussian_noise", severity=5, n=SAMPLES,
                      protocol="episodic", workdir=directory / "sim")
    x, _, _, _ = stream_samples("digits", ("gaussian_noise",), 5, "episodic", SAMPLES, 0, 0.0, (1, 32, 32))
    host.reset()
    assert report.predictions == [host.step(x[i]).prediction for i in range(SAMPLES)]
    state = host.state()
    assert set(report.final_state) == set(state)
    differ = [k for k, v in state.items() if not np.array_equal(np.asarray(report.final_state[k]).reshape(-1),
                                                                 v.reshape(-1))]
    assert set(differ) <= {"state_class_prior"}, differ
    np.testing.assert_allclose(np.asarray(report.final_state["state_class_prior"]).reshape(-1),
                               state["state_class_prior"].reshape(-1), rtol=1e-6, atol=0)


@needs_tool("arm-none-eabi-gcc", "make", "qemu-system-arm")
def test_cortex_m4_firmware_equals_the_host_build(bundle, host, tmp_path):
    """The same generated C in cortex-m4 firmware under QEMU."""
    _device_equals_host(bundle, host, "cortex-m4", tmp_path)


@needs_tool("aarch64-linux-gnu-gcc", "make", "qemu-aarch64-static")
def test_rpi4_program_equals_the_host_build(bundle, host, tmp_path):
    """rpi4's kernels come from TVM's LLVM backend, not the C the host build compiles: the step's statistics
    and folds keep their products unfused (``norm_align.unfused``), so they are the host's bit for bit."""
    _device_equals_host(bundle, host, "rpi4", tmp_path)


def _one_image(digits, n: int) -> torch.Tensor:
    """One digit image ``n`` times: the statistics converge onto it, the aligned output onto one class, and
    the predictions collapse (a stream of different images of one class does not: aligning each to the source
    statistics spreads them over the classes)."""
    return to_tensor(digits.test_x[:1]).repeat(n, 1, 1, 1)


@pytest.fixture(scope="module")
def no_prior(mcunet, digits, tmp_path_factory):
    """A bundle, its integer reference and its host runtime without the class-prior correction: the prior
    pulls a collapsing stream's predictions apart, so a trip of the guard is certain only without it."""
    from edgetune.deploy.host import HostModel

    adaptable = prepare(copy.deepcopy(mcunet[0]), "norm-align", {"prior_rate": "0"}, model_name="mcunet-s")
    fit(adaptable, digits, progress=False, use_cache=False)
    out = tmp_path_factory.mktemp("na-no-prior") / "bundle"
    export(adaptable, digits, out, progress=False)
    ref = Int8NormAlign(copy.deepcopy(adaptable.method), QDQModel(out / "frozen.onnx"))
    ref.calibrate(digits.train_x[:CALIBRATION_IMAGES])
    return adaptable, ref, HostModel(out, workdir=tmp_path_factory.mktemp("na-no-prior-host")), out


def test_guard_trip_restores_source_in_torch_and_compiled(no_prior, digits):
    """The collapse guard trips on a collapsed stream (after its 100-sample warm-up) and every trip sends every
    statistic and fold back to source, bit for bit: in the compiled host runtime, in the integer reference
    and in the torch method; before the first trip the state had moved. (Each side runs free: on a repeated
    image the float32 and float64 folds sit at the same ties sample after sample, so their trips need not
    fall on the same sample.)"""
    fitted, ref, host, _ = no_prior
    assert host.manifest.runtime.guard.restore == "source"  # declared: the runtime links it, no hand wiring
    x = _one_image(digits, 300)
    ref.reset()
    host.reset()
    source = host.state()
    method = copy.deepcopy(fitted.method)
    method.reset()
    torch_source = {n: method.get_buffer(n).clone() for n in method.state_names()}
    trips: dict[str, list[int]] = {"reference": [], "host": [], "torch": []}
    moved = False
    for i in range(len(x)):
        before = ref.restores
        ref.step(x[i:i + 1])
        if ref.restores > before:
            trips["reference"].append(i)
            assert all(torch.equal(m, s) and torch.equal(sq, t) for (m, sq), (s, t) in zip(ref.state, ref.source))
        got = host.step(x[i].numpy())
        if got.restored:
            trips["host"].append(i)
            state = host.state()
            assert all(np.array_equal(state[n], source[n]) for n in source), i
        elif not trips["host"]:
            moved = moved or any(not np.array_equal(host.state()[n], source[n]) for n in source if "offset" in n)
        before = method.restores
        method.step([x[i:i + 1]])
        if method.restores > before:
            trips["torch"].append(i)
            assert all(torch.equal(method.get_buffer(n), v) for n, v in torch_source.items())
    assert moved and trips["host"] and trips["reference"] and trips["torch"], trips
    assert min(trips["host"] + trips["reference"] + trips["torch"]) >= 99  # the warm-up: no trip before it
    assert host.counters()["restores"] == len(trips["host"]) and ref.restores == len(trips["reference"])


@needs_tool("arm-none-eabi-gcc", "make", "qemu-system-arm")
def test_guard_trip_restores_source_in_cortex_m4_firmware(no_prior, digits, tmp_path):
    """The firmware app (no app code for it) restores source on the same trips as the host build: the same
    predictions on the collapsing stream, the same number of restores, the same final state."""
    from edgetune.data import Dataset
    from edgetune.deploy import write_target_project
    from edgetune.simulate import simulate

    _, _, host, bundle = no_prior
    n = 240  # past the 100-sample warm-up and the first trip (sample 195 without the shift gate)
    image = digits.test_x[:1]
    copies, labels = np.repeat(image, n, 0), np.zeros(n, np.int64)
    stream = Dataset("one-digit", copies, labels, copies, labels, copies, labels)
    project = write_target_project(bundle, "cortex-m4", out_dir=tmp_path / "cortex-m4")
    report = simulate(project.directory, data=stream, corruption="none", n=n, protocol="episodic",
                      workdir=tmp_path / "sim")
    x = _one_image(digits, n).numpy()
    host.reset()
    want = [host.step(x[i]) for i in range(n)]
    assert report.predictions == [r.prediction for r in want]
    assert report.restores == sum(r.restored for r in want) > 0
    state = host.state()
    assert all(np.array_equal(np.asarray(report.final_state[k]).reshape(-1), v.reshape(-1)) for k, v in state.items())


def test_deployed_norm_align_carries_the_class_prior(fitted, bundle, digits):
    """The chosen configuration is what deploys: the class-prior correction is state of the torch method and
    of the bundle (uniform at reset), it moves with the stream, and with momentum 0 (adaptation off, or a
    labelled sample) neither it nor the prediction moves: the corrected prediction is the plain one."""
    method = copy.deepcopy(fitted.method)
    method.reset()
    assert method.config.prior_rate == 0.02 and method.state_names()[-1] == "class_prior"
    state = np.load(bundle / "initial_state.npz")
    assert np.allclose(state["state_class_prior"], 0.1)
    x = _stream(digits)
    names = method.state_names()
    frozen = [method.get_buffer(n).clone() for n in names]
    logits, _, new_state = method.forward_graph([x[:1]], frozen, torch.tensor([0.0]), torch.zeros(1, 10))
    assert torch.equal(new_state[-1], frozen[-1])
    plain = copy.deepcopy(method)
    plain.config = dataclasses.replace(method.config, prior_rate=0.0)
    raw, _, _ = plain.forward_graph([x[:1]], frozen[:-1], torch.tensor([0.0]), torch.zeros(1, 10))
    torch.testing.assert_close(logits, torch.log_softmax(raw, -1), rtol=0, atol=1e-5)
    for i in range(SAMPLES):
        method.step([x[i:i + 1]])
    assert not torch.equal(method.get_buffer("class_prior"), frozen[-1])
