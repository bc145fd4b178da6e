"""The shift gate of norm-align's int8 variants: ``edgetune.methods.norm_align_gate`` (one definition for the torch
method, the compiled step, the integer reference and the study's batched variants)."""
from edgetune.methods.norm_align_gate import GATES, channel_gate, global_gate, noise_weight, z2

__all__ = ["GATES", "channel_gate", "global_gate", "noise_weight", "z2"]
