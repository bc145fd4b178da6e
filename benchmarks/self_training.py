"""The self-training rules tried for tinytta's exit heads, on the validation corruptions.

tinytta's default test-time update (soft cross-entropy of the heads towards the prior-corrected
ensemble, lr 0.05, depth weights (k/K)^4, ``edgetune/methods/tinytta.py``) was chosen here among
rules that are not config fields of tinytta, so this script adds them to a subclass of it:

* ``hard=1``: hard pseudo-labels (the ensemble's argmax) instead of its probabilities;
* ``tau``: a confidence filter (no update unless the ensemble's max-probability exceeds it;
  as FixMatch, Sohn et al. NeurIPS 2020);
* ``cls=1``: the backbone's classifier (the last exit) learns too;
* ``im``: SHOT's information maximisation (Liang et al. ICML 2020): entropy of each head minus
  ``im`` x the entropy of its running marginal;
* ``proto``: T3A-style running class prototypes of the aligned last feature (Iwasawa & Matsuo,
  NeurIPS 2021), rate ``proto``, added to the classifier's logits with weight ``beta``
  (temperature 10), updated only above confidence ``ptau``.

Every run is the accuracy benchmark's (mcunet-s, int8 taps from onnxruntime, batch 1), on the
validation split only; the fitted heads are shared between variants.

    python benchmarks/self_training.py --samples 1000 \\
        --grid '[{"method": "feature-align"}, {}, {"prior_rate": 0}, {"hard": 1, "tau": 0.9}, {"cls": 1, "lr": 0.001}]'
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import VALIDATION_CORRUPTIONS, build_stream, load_dataset
from edgetune.evaluate import run_stream, tap_function
from edgetune.methods import prior
from edgetune.methods.base import Range, declare, setting, stop_gradient
from edgetune.methods.tinytta import POOLED_NO_EXITS, TinyTTA, TinyTTAConfig


@dataclass(frozen=True)
class VariantConfig(TinyTTAConfig):
    # the study ran on tinytta's pooled heads without exits (the default before the grid exit)
    exit_threshold: float = setting(1.0, Range(0.0, 1.0), "exit early above this confidence (1: never)")
    exit_grid: tuple[int, ...] = field(default=(), metadata={"help": "grid of each early exit's head (study: pooled)"})
    exit_stages: tuple[int, ...] = field(default=(), metadata={"help": "open early exits (study: every stage)"})
    hard: int = setting(0, Range(0, 1), "hard pseudo-labels")
    tau: float = setting(0.0, Range(0.0, 1.0), "confidence filter of the update")
    cls: int = setting(0, Range(0, 1), "the classifier learns too")
    im: float = setting(0.0, Range(0.0, 100.0), "SHOT diversity weight (0: no IM loss)")
    proto: float = setting(0.0, Range(0.0, 1.0), "T3A prototype rate (0: none)")
    ptau: float = setting(0.0, Range(0.0, 1.0), "prototype update confidence")
    beta: float = setting(1.0, Range(0.0, 100.0), "prototype logit weight")


@declare
class TinyTTAVariant(TinyTTA):
    """tinytta with the rejected rules switchable (benchmark only; never exported)."""

    name = "tinytta-variant"
    Config = VariantConfig
    config: VariantConfig

    def __init__(self, backbone, config: VariantConfig) -> None:
        super().__init__(backbone, config)
        self.classifier.requires_grad_(bool(config.cls))
        w = self.classifier.weight.detach()
        self.register_buffer("protos", w / w.norm(dim=1, keepdim=True))
        self.register_buffer("marginal", prior.uniform_prior(self.num_classes))

    def trainable_names(self):
        extra = [n for n, _ in self.classifier.named_parameters(prefix="classifier")] if self.config.cls else []
        return super().trainable_names() + extra

    def state_names(self):
        return super().state_names() + ["protos", "marginal"]

    def forward_graph(self, taps, state, momentum, target):
        c, k = self.config, self.depth
        state, protos, marginal = state[:-2], state[-2], state[-1]
        feats = [self.aligner.align(i, taps[i], state[2 * i], state[2 * i + 1], momentum) for i in range(k)]
        new_state = [s for _, mean, sqmean in feats for s in (mean, sqmean)]
        z = [f[0] for f in feats]
        last = self.classifier(z[-1])
        zn = z[-1] / z[-1].norm(dim=1, keepdim=True).clamp_min(1e-6)
        if c.proto > 0:
            last = last + c.beta * 10.0 * zn @ protos.t()
        log_probs = F.log_softmax(torch.cat([h(f) for h, f in zip(self.heads, z)] + [last]), dim=-1)
        prediction, chosen = self.ensemble(stop_gradient(log_probs))
        if c.prior_rate > 0:
            prediction = prior.correct(prediction, state[-2], c.prior_strength)
            new_state.append(prior.update(state[-2], prediction, c.prior_rate))
        ran = 1.0 - self.prefix_sum @ chosen + chosen
        n = k if c.cls else k - 1
        pseudo = (prediction >= prediction.max()).float() if c.hard else prediction
        keep = (prediction.max() > c.tau).float()
        labelled = target.sum()
        soft_target = labelled * target + (1.0 - labelled) * keep * pseudo
        loss = -(ran[:n, None] * soft_target * log_probs[:n]).sum()
        probs = log_probs[:n].exp()
        if c.im > 0:
            mix = 0.9 * marginal + 0.1 * probs
            loss = (ran[:n] * (-(probs * log_probs[:n]).sum(-1)
                               + c.im * (mix * torch.log(mix.clamp_min(1e-12))).sum(-1))).sum()
        new_state.append(chosen)
        onehot = (prediction >= prediction.max()).float() * (prediction.max() > c.ptau).float()
        moved = protos + c.proto * onehot.t() * (zn - protos)
        new_state += [moved / moved.norm(dim=1, keepdim=True).clamp_min(1e-6),
                      (0.99 * marginal + 0.01 * prediction).detach()]
        return torch.log(prediction.clamp_min(1e-12)), loss, new_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="samples per validation corruption")
    p.add_argument("--grid", default='[{"method": "feature-align"}, {}]',
                   help="JSON list of overrides; 'method' picks another method (default tinytta-variant)")
    p.add_argument("--protocols", default="episodic,continual")
    p.add_argument("--checkpoint", default="checkpoints/mcunet-s-fashion-mnist")
    p.add_argument("--out", default="results/self_training")
    a = p.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist")
    backbone, cfg = load_checkpoint(a.checkpoint)
    fitted: dict[tuple, dict] = {}
    taps: dict[tuple, object] = {}
    rows = []
    for protocol in a.protocols.split(","):
        segments = build_stream(data, VALIDATION_CORRUPTIONS, 5, protocol, 0, a.samples, split="val")
        for overrides in json.loads(a.grid):
            overrides = dict(overrides)
            method = overrides.pop("method", "tinytta-variant")
            start = time.time()
            adaptable = prepare(copy.deepcopy(backbone), method, {k: str(v) for k, v in overrides.items()},
                                model_name=cfg["model"])
            key = (method, overrides.get("hidden", 0), float(overrides.get("prior_rate", 0.02)) > 0)
            if key in fitted:  # the fit does not depend on the test-time rule: share it
                adaptable.method.load_state_dict(fitted[key], strict=True)
            else:
                fit(adaptable, data, seed=0, progress=False)
                fitted[key] = copy.deepcopy(adaptable.method.state_dict())
            spec = tuple(adaptable.method.taps())
            if spec not in taps:  # the frozen int8 graph does not depend on the rule: export plain tinytta
                plain = adaptable
                if method == "tinytta-variant":
                    plain = prepare(copy.deepcopy(backbone), "tinytta", POOLED_NO_EXITS, model_name=cfg["model"])
                    fit(plain, data, seed=0, progress=False)
                fn, _ = tap_function(plain, data, "onnx-int8")
                cache: dict[str, list] = {}

                def cached(adp, images, fn=fn, cache=cache):
                    h = hashlib.sha1(images.tobytes()).hexdigest()
                    if h not in cache:
                        cache[h] = fn(adp, images)
                    return cache[h]
                taps[spec] = cached
            result = run_stream(adaptable, segments, taps[spec], progress=False)
            row = {"protocol": protocol, "method": method, "overrides": overrides, "mean": result.mean,
                   "restores": result.restores, "per_corruption": result.per_corruption,
                   "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(f"{protocol:<10} {method:<16} {json.dumps(overrides):<60} {100 * result.mean:6.2f}  "
                  f"restores {result.restores}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
