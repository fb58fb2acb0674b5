"""Inference: prediction, export (ONNX / TorchScript) and evaluation of trained artifacts."""
