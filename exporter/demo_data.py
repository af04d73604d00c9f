"""Real labelled images for training small models offline: patches of real photographs.

scikit-image ships a few real photographs inside its wheel (no download).  Three are
photographs of textures, ``brick``, ``grass`` and ``gravel`` (grayscale, 512x512), and
classifying a patch by its texture is a real, if small, vision task.  The photographs'
top three quarters give training patches and the bottom quarter is held out for the
demo photos and for tests, so no test image was seen in training.

License: the scikit-image sample images used here are in the public domain / CC0 (see
scikit-image's ``skimage/data/README.txt`` and its documentation of ``skimage.data``);
convlens records this in ``convlens/demo/LICENSE-data.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TEXTURES = ("brick", "grass", "gravel")
PHOTOS = ("chelsea", "coffee", "rocket")  # RGB photographs: cat, coffee cup, rocket
HOLDOUT = 0.75  # rows below this fraction are held out from training


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as uint8 (H, W) or (H, W, 3) RGB."""
    from skimage import data

    img = getattr(data, name)()
    return np.asarray(img, dtype=np.uint8)


def patches(
    names: Sequence[str],
    n_per_class: int,
    size: int,
    *,
    rgb: bool = False,
    split: str = "train",
    seed: int = 0,
    scale_range: tuple[float, float] = (0.6, 1.6),
) -> tuple[np.ndarray, np.ndarray]:
    """Random square patches, rescaled to ``size``; labels are the photo's index.

    Returns uint8 images (N, size, size, 3 if rgb else 1) and int labels (N,).
    ``split="train"`` samples the top 3/4 of each photo, ``"holdout"`` the bottom 1/4.
    """
    import cv2

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, name in enumerate(names):
        img = load_photo(name)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        h, w = img.shape[:2]
        cut = int(h * HOLDOUT)
        region = img[:cut] if split == "train" else img[cut:]
        rh = region.shape[0]
        for _ in range(n_per_class):
            side = int(min(rh, w, size * rng.uniform(*scale_range)))
            y0 = int(rng.integers(0, rh - side + 1))
            x0 = int(rng.integers(0, w - side + 1))
            crop = region[y0 : y0 + side, x0 : x0 + side]
            interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
            crop = cv2.resize(crop, (size, size), interpolation=interp)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            xs.append(crop)
            ys.append(label)
    x = np.stack(xs)
    if not rgb:
        x = cv2.cvtColor(x.reshape(-1, size, 3), cv2.COLOR_RGB2GRAY).reshape(-1, size, size, 1)
    order = rng.permutation(len(ys))
    return np.ascontiguousarray(x[order]), np.asarray(ys, np.int64)[order]
