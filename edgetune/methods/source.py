"""source: the pretrained backbone as it is, no adaptation — the floor every method must beat."""
from __future__ import annotations

from edgetune.methods.base import Method, TapSpec, declare, entropy, supervised_or


@declare
class Source(Method):
    name = "source"
    paper = "no adaptation (baseline)"

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(len(self.backbone.stages) - 1, pooled=True),)

    def forward_graph(self, taps, state, momentum, target):
        logits = self.classifier(taps[0])
        return logits, supervised_or(entropy(logits).sum(), logits, target), []
