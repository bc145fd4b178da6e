"""The method -> runtime contract: a method declared in this file alone, with a schedule and a guard
that are nobody's defaults, runs the same in torch and in the compiled C runtime (no other edit)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgetune.adapt import fit, prepare
from edgetune.data import corrupt, to_tensor
from edgetune.deploy.host import HostModel
from edgetune.deploy.project import save_initial_state
from edgetune.export import export
from edgetune.methods import METHODS
from edgetune.methods.align import FeatureAligner
from edgetune.methods.base import Guard, Method, MethodConfig, Range, Schedule, TapSpec, entropy, setting, supervised_or
from edgetune.ort_runtime import OrtTaps

from conftest import needs_tool

SAMPLES = 40
SCHEDULE = Schedule(start=0.35, decay=0.8, floor=0.03)  # feature-align's is (0.1, 0.94, 0.005)
GUARD = Guard(rate=0.05, max_share=0.95, every=7, warmup=10)  # the default snapshots every 50


@dataclass(frozen=True)
class ProbeConfig(MethodConfig):
    lr: float = setting(0.05, Range(0.0, 10.0), "SGD learning rate of the classifier's bias")
    fit_epochs: int = setting(0, Range(0, 100_000), "no fit: the bias starts at the backbone's")


class ContractProbe(Method):
    """Aligned last tap, classifier bias trained by entropy (or towards a revealed label)."""

    name = "contract-probe"
    paper = "test-only"
    Config = ProbeConfig

    def __init__(self, backbone, config) -> None:
        super().__init__(backbone, config)
        self.last = len(backbone.stages) - 1
        self.aligner = FeatureAligner([backbone.stage_widths()[self.last]])
        self.classifier.bias.requires_grad_(True)
        self.classifier.weight.requires_grad_(False)

    def taps(self):
        return (TapSpec(self.last, pooled=True),)

    def trainable_names(self):
        return ["classifier.bias"]

    def state_names(self):
        return self.aligner.state_names("aligner.")

    def calibrate(self, batches) -> None:
        self.aligner.calibrate([torch.cat([b[0] for b in batches])])

    def schedule(self) -> Schedule:
        return SCHEDULE

    def guard(self) -> Guard:
        return GUARD

    def fit_loss(self, taps, labels):
        return F.cross_entropy(self.classifier(taps[0]), labels)

    def forward_graph(self, taps, state, momentum, target):
        z, mean, sqmean = self.aligner.align(0, taps[0], state[0], state[1], momentum)
        logits = self.classifier(z)
        return logits, supervised_or(entropy(logits).sum(), logits, target), [mean, sqmean]


@pytest.fixture
def registered():
    METHODS.register(ContractProbe.name)(ContractProbe)
    yield ContractProbe.name
    METHODS._entries.pop(ContractProbe.name)  # the registry has no public removal: tests only


@needs_tool("gcc")
def test_a_method_declared_here_runs_identically_in_torch_and_the_compiled_runtime(registered, tiny_cnn, digits,
                                                                                  tmp_path):
    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), registered, model_name="tiny-cnn")
    fit(adaptable, digits, progress=False, use_cache=False)
    manifest = export(adaptable, digits, tmp_path / "bundle", progress=False)
    save_initial_state(tmp_path / "bundle", adaptable.method)  # the statistics the device starts from
    runtime = manifest.runtime
    assert (runtime.momentum_schedule.start, runtime.momentum_schedule.decay, runtime.momentum_schedule.floor) == (
        SCHEDULE.start, SCHEDULE.decay, SCHEDULE.floor)
    assert (runtime.guard.every, runtime.guard.warmup, runtime.labels, runtime.exits) == (7, 10, "target", None)

    # torch on the bundle's int8 taps (what the compiled frozen graph computes) vs the whole sample in C
    method, taps_of = adaptable.method, OrtTaps(tmp_path / "bundle")
    method.reset()
    host = HostModel(tmp_path / "bundle", workdir=tmp_path / "host")
    x = to_tensor(corrupt(digits.test_x[:SAMPLES], "gaussian_noise", 5, seed=0))
    for i in range(SAMPLES):
        momentum = np.float32(torch.tensor([method.momentum_now()]).item())
        assert momentum == np.float32(SCHEDULE.at(i))
        logits = method.step(taps_of(x[i:i + 1]))
        got = host.step(x[i].numpy())
        assert got.momentum == momentum, f"sample {i}: the runtime's momentum is not the declared schedule's"
        assert got.prediction == int(logits.argmax()), f"sample {i}: prediction differs"
        if i % 3 == 2:  # a revealed label: one update of the bias, statistics untouched, in both
            label = (int(logits.argmax()) + 1) % method.num_classes
            method.step(taps_of(x[i:i + 1]), F.one_hot(torch.tensor([label]), method.num_classes).float())
            host.feedback(x[i].numpy(), label)
    state, compared = host.state(), []
    for name, value in method.state_dict().items():
        key = next((k for k in (name.replace(".", "_"), f"state_{name.replace('.', '_')}") if k in state), None)
        if key is not None:
            np.testing.assert_allclose(state[key].reshape(value.shape), value.numpy(), atol=1e-4, rtol=0)
            compared.append(name)
    assert {"classifier.bias", "aligner.mean0", "aligner.sqmean0"} <= set(compared)
    counters = host.counters()
    # the declared guard's snapshot period reached C (none of the default's 50 would fall in 40 samples)
    assert counters["snapshots"] == SAMPLES // GUARD.every - counters["restores"] and counters["restores"] == 0
    assert counters["labelled"] == SAMPLES // 3
