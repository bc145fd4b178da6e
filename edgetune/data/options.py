"""The command-line options of data, in one place for every verb that reads data.

``add_data_options(parser, ...)`` adds ``--data``, ``--resize``, ``--crop`` and, for verbs that
fit, ``--source-data``, ``--source-mode``, ``--warmup``; the values go straight to
``load_data`` / ``checkpoint_source`` / ``evaluate`` / ``simulate``.
"""
from __future__ import annotations

import argparse

from edgetune.data.roles import SOURCE_MODES, WARMUP

DATA_HELP = ("a built-in dataset (digits, fashion-mnist, hapt), an image folder (one subfolder per class; PNG/JPEG, "
             "grey or RGB; no subfolders: unlabelled) or a .npz (x: N x C x H x W, N x H x W x C, N x H x W or "
             "N x C x T; y optional)")


def size(text: str) -> tuple[int, int]:
    """``H,W`` -> (H, W), both positive (argparse type)."""
    parts = text.replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (got {text!r}); e.g. 32,32") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive (got {text})")
    return h, w


def add_data_options(s: argparse.ArgumentParser, data_default: str | None = None, data_help: str = "",
                     source: bool = False, warmup: bool = False) -> None:
    """``--data``, ``--resize``, ``--crop``; with ``source`` also ``--source-data`` and
    ``--source-mode``; with ``warmup`` also ``--warmup`` (eval's no-source mode)."""
    s.add_argument("--data", default=data_default, metavar="DATA", help=f"{data_help} {DATA_HELP}".strip())
    s.add_argument("--resize", type=size, default=None, metavar="H,W",
                   help="resize every image (bilinear) or 1-D window (W: length) to H,W (default: keep the size; "
                        "a size other than the model's is refused)")
    s.add_argument("--crop", type=size, default=None, metavar="H,W", help="centre-crop images to H,W (after --resize)")
    if source:
        s.add_argument("--source-data", default=None, metavar="DATA",
                       help="what fit and int8 calibration read (its training split; default: the data the "
                            "checkpoint was trained on; a model without that record needs it)")
        s.add_argument("--source-mode", default="labelled", choices=SOURCE_MODES if warmup else SOURCE_MODES[:2],
                       help="labelled: the source's labels train the attachments; unlabelled: statistics, "
                            "calibration and distillation from the model's own predictions, no label read"
                            + ("; none: no source, a warm-up on the first --warmup stream samples (still scored)"
                               if warmup else ""))
    if warmup:
        s.add_argument("--warmup", type=int, default=WARMUP, metavar="K",
                       help=f"--source-mode none: stream samples of the warm-up (default {WARMUP})")


__all__ = ["DATA_HELP", "add_data_options", "size"]
