"""Bring your own model: any callable returning an ``edgetune.models.Backbone`` works as ``--model``.

    edgetune train-source --model examples.user_model:small_cnn --data digits -o runs/mine

The callable receives ``num_classes``, ``in_channels`` and ``image_size``; the backbone must
be cut into stages (taps are stage outputs) and end in a linear ``classifier``.
"""
from __future__ import annotations

from torch import nn

from edgetune.models import Backbone
from edgetune.models.blocks import ConvNormAct


class SmallCNN(Backbone):
    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.stages = nn.ModuleList([ConvNormAct(in_channels, 8, 3, 2), ConvNormAct(8, 16, 3, 2)])
        self.classifier = nn.Linear(16, num_classes)


def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, image_size)


if __name__ == "__main__":
    from edgetune.adapt import fit, prepare
    from edgetune.data import build_stream, load_dataset
    from edgetune.evaluate import run_stream
    from edgetune.train import train_source
    from edgetune.checkpoint import load_checkpoint

    data = load_dataset("digits")
    # Run as a script, this file's folder is on sys.path, so the model is "user_model:small_cnn".
    train_source("user_model:small_cnn", data, "runs/user-model", epochs=15, progress=False)
    backbone, _ = load_checkpoint("runs/user-model")
    adaptable = prepare(backbone, "feature-align")
    fit(adaptable, data, progress=False)
    stream = build_stream(data, ("gaussian_noise", "contrast"), severity=5, protocol="episodic")
    result = run_stream(adaptable, stream, progress=False)
    print(f"your model + feature-align on digits: {100 * result.mean:.1f}% online accuracy")
