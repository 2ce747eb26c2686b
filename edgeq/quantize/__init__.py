"""Quantization: pure primitives, calibrators, methods (RTN, GPTQ, ...) and the quantized model."""
