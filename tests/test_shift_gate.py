"""The shift gate of norm-align's int8 variants: its noise unit, its two gates, and gated rows in a batch."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from edgetune.data import build_stream, to_tensor
from edgetune.errors import ConfigError
from edgetune.int8ref.norm_align_int8 import int8_graph
from edgetune.int8ref.qdq_model import QDQModel
from edgetune.int8ref.shift_gate import channel_gate, global_gate, noise_weight, z2
from edgetune.int8ref.variants import DUA, AlignedStreams, Variant, conv_stages, momentum_at

SAMPLES = 40


def _running_z2(shift: float, steps: int, channels: int = 400) -> torch.Tensor:
    """Mean z^2 after ``steps`` DUA updates of a running (mean, E[y^2]) started at the source values, fed
    per-sample statistics drawn around the source's (moved by ``shift`` spreads)."""
    gen = torch.Generator().manual_seed(0)
    source = (torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64))
    spread = (torch.full((channels,), 0.04, dtype=torch.float64), torch.full((channels,), 0.09, dtype=torch.float64))
    state, w2 = (source[0].clone(), source[1].clone()), torch.zeros(1, dtype=torch.float64)
    for t in range(steps):
        m = momentum_at(t, DUA)
        sample = [s + sp.sqrt() * (shift + torch.randn(channels, generator=gen, dtype=torch.float64))
                  for s, sp in zip(source, spread)]
        state = tuple((1 - m) * r + m * s for r, s in zip(state, sample))
        w2 = noise_weight(w2, torch.tensor(m, dtype=torch.float64))
    return z2(state, source, spread, w2).mean()


def test_z2_is_about_one_without_a_shift_and_grows_with_one():
    for steps in (5, 50, 400):
        assert 0.8 < float(_running_z2(0.0, steps)) < 1.2, steps
    assert float(_running_z2(0.5, 400)) > 30.0  # half a spread, a window of ~400 samples: (0.5 / 0.05)^2 / ...
    assert float(_running_z2(0.5, 400)) > 3 * float(_running_z2(0.5, 20))  # the evidence accumulates


def test_gates_map_z2_to_a_strength():
    level = torch.tensor([2.0])
    torch.testing.assert_close(global_gate(torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0]), level),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(channel_gate(torch.tensor([0.0, 1.0, 2.0, 8.0]), level),
                               torch.tensor([0.0, 0.0, 0.0, 0.75]))


@pytest.fixture(scope="module")
def bank_parts(mcunet, digits, tmp_path_factory):
    path = int8_graph(mcunet[0], digits.train_x, digits.name, tmp_path_factory.mktemp("gate") / "frozen.onnx")
    return QDQModel(path), conv_stages(mcunet[0]), mcunet[0].for_export().classifier


def _bank(bank_parts, digits, variants):
    bank = AlignedStreams(*bank_parts, variants)
    bank.calibrate(to_tensor(digits.train_x[:300]))
    return bank


def test_gated_rows_fold_nothing_when_closed_and_everything_when_open(bank_parts, digits):
    """A gate that never opens predicts what the unfolded graph predicts (with the same prior correction);
    one that is always open follows the ungated fold; on a shifted stream a real level opens."""
    prior = Variant("prior", prior_rate=0.02)
    variants = [dataclasses.replace(prior, name="closed", gate="global", gate_level=1e12),
                Variant("unfolded", first_stage=4, pooled=False, prior_rate=0.02), prior,
                dataclasses.replace(prior, name="open", gate="channel", gate_level=1e-12),
                dataclasses.replace(prior, name="global 3", gate="global", gate_level=3.0)]
    bank = _bank(bank_parts, digits, variants)
    x = to_tensor(build_stream(digits, ("gaussian_noise",), 5, "episodic", 0, SAMPLES)[0].images)
    rows, strength = [], []
    for i in range(SAMPLES):
        rows.append(bank.step(x[i:i + 1].expand(len(variants), -1, -1, -1)))
        strength.append(bank.global_strength[4, 0].item())
    rows = torch.stack(rows)
    assert rows[:, 0].tolist() == rows[:, 1].tolist()
    assert rows[:, 2].tolist() != rows[:, 1].tolist()  # the fold changes predictions on this stream
    assert (rows[:, 3] == rows[:, 2]).float().mean() >= 0.95  # open: the same affine up to float rounding
    # the noise stream is a shift the detector finds; the fold it opens brings the aligned layers' statistics
    # back towards the source's, so the gate settles part-open (0.81 after 40 digits samples)
    assert strength[0] == 0.0 and strength[-1] > 0.5


def test_gate_stays_closed_on_source_images(bank_parts, digits):
    """Images the source statistics were not measured on, but from the same distribution: the global gate at
    level 3 stays closed for most of the stream (the clean cost it is meant to remove)."""
    bank = _bank(bank_parts, digits, [Variant("global 3", prior_rate=0.02, gate="global", gate_level=3.0)])
    x = to_tensor(digits.train_x[300:300 + SAMPLES])
    strength = []
    for i in range(SAMPLES):
        bank.step(x[i:i + 1])
        strength.append(bank.global_strength[0, 0].item())
    assert sum(s == 0.0 for s in strength) >= 0.9 * SAMPLES


def test_a_bad_gate_is_a_config_error(bank_parts, digits):
    with pytest.raises(ConfigError, match="variant 'g' has gate 'sometimes', gate_level 0.0"):
        _bank(bank_parts, digits, [Variant("g", gate="sometimes", gate_level=0.0)])


def _torch_method(mcunet, digits, **overrides):
    from edgetune.adapt import fit, prepare

    adaptable = prepare(copy.deepcopy(mcunet[0]), "norm-align", overrides, model_name="mcunet-s")
    fit(adaptable, digits, progress=False, use_cache=False)
    adaptable.method.reset()
    return adaptable.method


def test_torch_method_gates_its_folds(mcunet, digits):
    """The torch method carries the gate by default (level 3): closed at reset, its noise weight follows
    ``noise_weight`` sample by sample, it opens on a shifted stream; a gate that never opens folds nothing,
    so the method predicts what the unaligned backbone predicts."""
    method = _torch_method(mcunet, digits, prior_rate="0")
    assert method.config.gate_level == 3.0 and "gate_w" in method.state_names()
    n = len(method.aligned)
    x = to_tensor(build_stream(digits, ("gaussian_noise",), 5, "episodic", 0, SAMPLES)[0].images)
    strength = []
    for i in range(SAMPLES):
        pairs = [(method.get_buffer(f"mean{k}"), method.get_buffer(f"sqmean{k}")) for k in range(n)]
        w2, momentum = method.get_buffer("gate_w").clone(), torch.tensor(method.momentum_now())
        strength.append(float(method.gate_strength(pairs, w2)))
        method.step([x[i:i + 1]])
        assert torch.equal(method.get_buffer("gate_w"), noise_weight(w2, momentum)), i
    assert strength[0] == 0.0 and strength[-1] > 0.5, strength
    closed = _torch_method(mcunet, digits, prior_rate="0", gate_level="1e6")
    plain = mcunet[0].for_export().eval()
    with torch.no_grad():
        assert [int(closed.step([x[i:i + 1]]).argmax()) for i in range(SAMPLES)] == \
            [int(plain(x[i:i + 1]).argmax()) for i in range(SAMPLES)]
