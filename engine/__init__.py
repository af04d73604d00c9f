"""convlens.engine: run an analysis ONNX over images with onnxruntime (no TensorFlow)."""
