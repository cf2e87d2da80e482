"""AnchorRT: vision-language models to ONNX Runtime / TensorRT with hallucination mitigation in the graphs."""

__version__ = "0.1.0"
