"""convlens.engine: run an analysis ONNX over images with onnxruntime (no TensorFlow)."""

import os as _os

from .formats import DEFAULT_MAX_PIXELS as _DEFAULT_MAX_PIXELS

# OpenCV reads its own per-decode pixel cap once, when cv2 loads (default 2**30): every
# engine module that decodes imports cv2 after this, so no decode allocates for more
# pixels than the default limit, whatever the format or its header says (a user's own
# setting of the variable wins).
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(_DEFAULT_MAX_PIXELS))
