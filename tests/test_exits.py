"""Early exits that skip compute: tinytta with an exit threshold that some samples pass.

The exits checked end to end: tinytta's default (a frozen head on stage 0's map pooled to a 4x4 grid, one probe)
and pooled heads at every stage (``exit_grid=1``, every exit open: a probe after each).

The fidelity chain holds per sample including the exit taken: torch (on the bundle's int8 taps) =
onnxruntime int8 (frozen.onnx + trainable.onnx) = the compiled host runtime = the firmware in
QEMU; a sample that exits early runs fewer instructions there than one that does not, because the
generated plan stops the frozen graph after the exit's stage.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil

import numpy as np
import pytest
import torch

from edgetune.adapt import fit, prepare
from edgetune.deploy.host import HostModel
from edgetune.deploy.project import save_initial_state
from edgetune.export import export
from edgetune.ort_runtime import OrtTaps, OrtTrainable
from edgetune.simulate import stream_samples

SAMPLES = 48
POOLED = {"exit_grid": "1", "exit_stages": ""}  # pooled heads at every stage, each exit open (a probe after each)
QEMU_TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm", "make")


def _exit_share(method, taps: list[list[torch.Tensor]], threshold: float) -> float:
    m = copy.deepcopy(method)
    m.config = dataclasses.replace(m.config, exit_threshold=threshold)
    m._initial = None
    m.reset()
    exits = 0
    for t in taps:
        m.step(t)
        exits += m.last_exit < m.depth - 1
    return exits / len(taps)


@pytest.fixture(scope="module")
def stream(digits):
    x, labels, _, _ = stream_samples(digits, ("gaussian_noise", "contrast"), 5, "continual", SAMPLES, 0, 0.0,
                                     (1, 32, 32))
    return x.reshape(len(x), 1, 32, 32).astype(np.float32), labels


@pytest.fixture(scope="module", params=["grid", "pooled"])
def exiting(request, tiny_cnn, digits, stream, tmp_path_factory):
    """(bundle, fitted tinytta) whose threshold makes about half of the stream exit early: "grid", tinytta's
    default exit (a frozen 4x4-grid head on stage 0's map, fit on shifted copies, one probe); "pooled", heads on
    pooled taps at every stage (a probe after each)."""
    settings = {**(POOLED if request.param == "pooled" else {}), "fit_epochs": "20", "fit_lr": "0.03"}
    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), "tinytta", settings, model_name="tiny-cnn")
    if request.param == "grid":
        assert adaptable.method.exit_grids[0] == 4 and adaptable.method.exit_stages == (0, adaptable.method.depth - 1)
    else:
        assert adaptable.method.exit_stages == tuple(range(adaptable.method.depth))
    fit(adaptable, digits, progress=False)
    m = adaptable.method  # after the fit, gradients reach only the heads that learn at test time (not a grid head)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(m.trainable_names())
    assert ("heads.0.weight" in m.trainable_names()) == (request.param == "pooled")
    taps = [adaptable.taps(torch.from_numpy(stream[0][i:i + 1])) for i in range(SAMPLES)]
    threshold = min((float(t) for t in np.linspace(0.12, 0.96, 22)),
                    key=lambda t: abs(_exit_share(adaptable.method, taps, t) - 0.5))
    m = adaptable.method
    m.config = dataclasses.replace(m.config, exit_threshold=threshold)
    m._initial = None
    m.reset()
    out = tmp_path_factory.mktemp("exits-bundle")
    export(adaptable, digits, out, progress=False)
    save_initial_state(out, m)
    return out, adaptable


def _torch_run(adaptable, bundle, x) -> tuple[list[int], list[int], list[torch.Tensor], dict]:
    """tinytta in torch on the bundle's int8 taps: predictions, exits, logits, final state."""
    m = copy.deepcopy(adaptable.method)
    m._initial = None
    m.reset()
    taps_of = OrtTaps(bundle)
    preds, exits, logits = [], [], []
    for i in range(len(x)):
        out = m.step(taps_of(torch.from_numpy(x[i:i + 1])))
        preds.append(int(out.argmax()))
        exits.append(m.last_exit)
        logits.append(out)
    return preds, exits, logits, {k: v.clone() for k, v in m.state_dict().items()}


def test_outputs_do_not_depend_on_the_taps_of_skipped_stages(exiting, stream):
    """What lets a runtime skip them: with every tap after the exit replaced by garbage, logits, loss
    and new state are bit-identical, and the statistics of the skipped stages stay as they were."""
    bundle, adaptable = exiting
    m = copy.deepcopy(adaptable.method)
    m.reset()
    taps_of = OrtTaps(bundle)
    checked = 0
    for i in range(SAMPLES):
        taps = taps_of(torch.from_numpy(stream[0][i:i + 1]))
        state = [m.get_buffer(n).clone() for n in m.state_names()]
        momentum, target = torch.tensor([m.momentum_now()]), torch.zeros(1, m.num_classes)
        with torch.no_grad():
            logits, loss, new_state = m.forward_graph(taps, state, momentum, target)
            exit_k = m.exit_stages[int(new_state[-1].argmax())]  # the exit state is one-hot over the declared exits
            garbage = [t if k <= exit_k else torch.randn_like(t) * 7 for k, t in enumerate(taps)]
            logits2, loss2, new_state2 = m.forward_graph(garbage, state, momentum, target)
        assert torch.equal(logits, logits2) and torch.equal(loss, loss2)
        assert all(torch.equal(a, b) for a, b in zip(new_state, new_state2))
        for k in range(exit_k + 1, m.depth):
            assert torch.equal(new_state[2 * k], state[2 * k]) and torch.equal(new_state[2 * k + 1], state[2 * k + 1])
        checked += exit_k < m.depth - 1
        m.step(taps)
    assert checked > 0


def test_torch_onnxruntime_and_compiled_host_agree_per_sample_including_exits(exiting, stream, tmp_path):
    bundle, adaptable = exiting
    x = stream[0]
    preds, exits, logits, final = _torch_run(adaptable, bundle, x)
    depth = adaptable.method.depth
    early = [e < depth - 1 for e in exits]
    assert 0 < sum(early) < len(early), f"the threshold should split the stream ({sum(early)} of {len(early)} exit)"
    # onnxruntime int8: frozen.onnx taps + trainable.onnx (the forward: compared with torch at lr 0)
    frozen_heads = copy.deepcopy(adaptable)
    frozen_heads.method.config = dataclasses.replace(frozen_heads.method.config, lr=0.0)
    _, exits0, logits0, _ = _torch_run(frozen_heads, bundle, x)
    m = frozen_heads.method
    taps_of, trainable = OrtTaps(bundle), OrtTrainable(bundle)
    state = [m.get_buffer(n).clone() for n in m.state_names()]
    schedule = m.contract().schedule
    for i in range(len(x)):
        o_logits, _, state = trainable(taps_of(torch.from_numpy(x[i:i + 1])), state,
                                       torch.tensor([schedule.at(i)]), torch.zeros(1, m.num_classes))
        assert m.exit_stages[int(state[-1].argmax())] == exits0[i], f"sample {i}: onnxruntime exits elsewhere"
        assert float((o_logits - logits0[i]).abs().max()) <= 1e-4, f"sample {i}"
    # the compiled host runtime: the whole sample in C, frozen stages after an exit skipped
    host = HostModel(bundle, workdir=tmp_path / "host")
    steps = [host.step(x[i]) for i in range(len(x))]
    assert [s.prediction for s in steps] == preds
    assert [s.early_exit for s in steps] == early
    got = host.state()
    for name, value in final.items():
        key = name.replace(".", "_")
        if key in got:
            np.testing.assert_allclose(got[key].reshape(value.shape), value.numpy(), atol=1e-4, rtol=0)
    assert host.counters()["early_exits"] == sum(early)


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in QEMU_TOOLS), reason=f"needs {', '.join(QEMU_TOOLS)}")
def test_in_qemu_an_early_exit_runs_fewer_instructions_and_exits_agree_with_the_host(exiting, stream, tmp_path):
    from edgetune.deploy.build import build_project
    from edgetune.deploy.project import write_target_project
    from edgetune.deploy.streams import EARLY_EXIT, write_stream
    from edgetune.simulate import run_program

    bundle, adaptable = exiting
    x = stream[0]
    host = HostModel(bundle, workdir=tmp_path / "host")
    want = [host.step(x[i]) for i in range(len(x))]
    project = write_target_project(bundle, "cortex-m4")
    built = build_project(project)
    path = write_stream(tmp_path / "stream.bin", x, None, None, built.project.classes)
    run = run_program(built, path, tmp_path, adapt=True)
    records = run.records
    early = (records["flags"] & EARLY_EXIT) != 0
    assert list(records["prediction"]) == [s.prediction for s in want]
    assert list(early) == [s.early_exit for s in want], "host and QEMU disagree on which samples exit"
    assert early.any() and (~early).any()
    # every exit ran fewer instructions than every sample that ran all stages
    assert records["step"][early].max() < records["step"][~early].min()
    saved = 1 - records["step"][early].mean() / records["step"][~early].mean()
    print(f"\nQEMU cortex-m4: {early.mean():.0%} exit early, {saved:.0%} fewer instructions each")


def test_agreement_rule_exports_and_onnxruntime_takes_the_same_exits(tiny_cnn, digits, stream, tmp_path):
    """The drift-aware rule (agreement trackers, exploration clock) is graph arithmetic: trainable.onnx in
    onnxruntime takes torch's exits and predictions, and skipped stages' taps change nothing."""
    settings = {**POOLED, "fit_epochs": "20", "fit_lr": "0.03", "exit_agreement": "0.5", "exit_explore": "4",
                "exit_rate": "0.2", "lr": "0"}  # lr 0: the forward alone, compared exactly
    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), "tinytta", settings, model_name="tiny-cnn")
    fit(adaptable, digits, progress=False)
    export(adaptable, digits, tmp_path, progress=False)
    m = copy.deepcopy(adaptable.method)
    m._initial = None
    m.reset()
    taps_of, trainable = OrtTaps(tmp_path), OrtTrainable(tmp_path)
    state = [m.get_buffer(n).clone() for n in m.state_names()]
    schedule = m.contract().schedule
    exits = []
    for i in range(SAMPLES):
        taps = taps_of(torch.from_numpy(stream[0][i:i + 1]))
        before = [m.get_buffer(n).clone() for n in m.state_names()]
        momentum, target = torch.tensor([m.momentum_now()]), torch.zeros(1, m.num_classes)
        logits = m.step(taps)
        exits.append(m.last_exit)
        with torch.no_grad():
            garbage = [t if k <= m.last_exit else torch.randn_like(t) * 7 for k, t in enumerate(taps)]
            logits2, _, new_state2 = m.forward_graph(garbage, before, momentum, target)
        assert torch.equal(logits, logits2) and all(torch.equal(a, m.get_buffer(n))
                                                   for a, n in zip(new_state2, m.state_names()))
        o_logits, _, state = trainable(taps, state, torch.tensor([schedule.at(i)]), target)
        assert m.exit_stages[int(state[-1].argmax())] == m.last_exit, f"sample {i}: onnxruntime exits elsewhere"
        assert float((o_logits - logits).abs().max()) <= 1e-4, f"sample {i}"
    early = sum(e < m.depth - 1 for e in exits)
    assert 0 < early <= SAMPLES - SAMPLES // 4, f"{early} of {SAMPLES} exit early"  # every 4th explores


def test_repricing_a_threshold_sweep_keeps_its_exits_and_prices_the_no_exit_plan_apart():
    """benchmarks/exits.py --reprice: a committed sweep's rows get exit shares x the new per-exit table, the
    no-exit row the no-exit plan's cost; accuracy, exit shares and the chosen threshold stay as measured."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "exits.py"
    spec = importlib.util.spec_from_file_location("exits_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sweep = {"chosen_threshold": 0.9, "per_exit_instructions": {"0": None, "1": 5.0, "2": 6.0, "3": 10.0},
             "test": [{"threshold": 1.0, "accuracy": 0.6, "exit_share": [0.0, 0.0, 0.0, 1.0]},
                      {"threshold": 0.9, "accuracy": 0.59, "exit_share": [0.1, 0.2, 0.3, 0.4]}]}
    costs = {0: 1.0, 1: 3.0, 2: 4.0, 3: 8.0}
    got = bench.price_thresholds(sweep, costs, "new table", 7.5)
    assert got["test"][0]["instructions_per_sample"] == 7.5 and got["test"][0]["relative_instructions"] == 1.0
    mean = 0.1 * 1 + 0.2 * 3 + 0.3 * 4 + 0.4 * 8
    assert abs(got["test"][1]["instructions_per_sample"] - mean) < 1e-12
    assert abs(got["test"][1]["relative_instructions"] - mean / 7.5) < 1e-12
    assert [r["accuracy"] for r in got["test"]] == [0.6, 0.59] and got["chosen_threshold"] == 0.9
    assert got["per_exit_instructions_before"] == sweep["per_exit_instructions"]
