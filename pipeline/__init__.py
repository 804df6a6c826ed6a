"""pipeline: PyTorch -> ONNX -> TVM compiler for MLP-style vision models."""
