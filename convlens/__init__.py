"""convlens: see what a Keras CNN looks at, over whole directories of images."""

__version__ = "0.1.0"
