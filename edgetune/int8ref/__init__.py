"""Integer reference of the int8 backbone with state-dependent requantisation (norm-align)."""
