"""ONNX -> TVM (Relax) compilers: the frozen int8 backbone and the trainable training step (in progress)."""
