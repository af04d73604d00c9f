"""convlens.exporter: turn a trained Keras model into one analysis ONNX file.

TensorFlow and tf2onnx are imported lazily, inside the functions that need them.
"""
