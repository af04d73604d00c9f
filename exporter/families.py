"""keras.applications families, recognised by their model names, and their input scaling.

Each family's ``preprocess_input`` is one of the engine's presets: ``caffe`` (BGR, ImageNet
mean subtracted), ``symmetric`` (x/127.5 - 1, Keras' "tf" mode), ``imagenet`` (x/255,
ImageNet mean/std, Keras' "torch" mode), or ``none`` where the model rescales its input
itself (EfficientNet, EfficientNetV2, ConvNeXt and MobileNetV3 with
``include_preprocessing=True``, the default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .trace import is_container


@dataclass(frozen=True)
class Family:
    name: str  # as keras.applications spells the constructors, e.g. "ResNet"
    pattern: str  # the default model name, as a regex
    preprocess: str  # preset of its preprocess_input
    builtin_scaling: bool = False  # preprocess_input is the identity when the model has it


FAMILIES: tuple[Family, ...] = (
    Family("VGG", r"vgg(16|19)", "caffe"),
    Family("ResNet", r"resnet(50|101|152)", "caffe"),
    Family("ResNetV2", r"resnet(50|101|152)v2", "symmetric"),
    Family("InceptionV3", r"inception_v3", "symmetric"),
    Family("InceptionResNetV2", r"inception_resnet_v2", "symmetric"),
    Family("Xception", r"xception", "symmetric"),
    Family("MobileNet", r"mobilenet_[0-9.]+_[0-9]+", "symmetric"),
    Family("MobileNetV2", r"mobilenetv2_[0-9.]+_[0-9]+", "symmetric"),
    Family("MobileNetV3", r"mobilenetv3(small|large)", "symmetric", builtin_scaling=True),
    Family("NASNet", r"nasnet_(mobile|large)", "symmetric"),
    Family("DenseNet", r"densenet(121|169|201)", "imagenet"),
    Family("EfficientNet", r"efficientnetb[0-7]", "symmetric", builtin_scaling=True),
    Family("EfficientNetV2", r"efficientnetv2-(b[0-3]|s|m|l)", "symmetric", builtin_scaling=True),
    Family(
        "ConvNeXt", r"convnext_(tiny|small|base|large|xlarge)", "imagenet", builtin_scaling=True
    ),
)


def _names(model: Any) -> list[str]:
    """The model's name and every nested model's, outermost first."""
    out = [str(model.name)]
    for layer in getattr(model, "layers", []):
        if is_container(layer):
            out += _names(layer)
    return out


def recognise(model: Any) -> tuple[Family, str] | None:
    """``(family, model name)`` for a keras.applications model or one that nests one."""
    for name in _names(model):
        for fam in FAMILIES:
            if re.fullmatch(fam.pattern, name, flags=re.IGNORECASE):
                return fam, name
    return None


def default_preprocess(model: Any, first_kinds: list[str]) -> tuple[str, str]:
    """``(preset, reason)``: what the export assumes when ``--preprocess`` is not given."""
    rescales = any(k in ("Rescaling", "Normalization") for k in first_kinds)
    found = recognise(model)
    if found is not None:
        fam, name = found
        if rescales and fam.builtin_scaling:
            return "none", f"{name} ({fam.name}) rescales its input itself"
        if not rescales:
            return fam.preprocess, f"{fam.name}'s preprocess_input, recognised from {name!r}"
    if rescales:
        return "none", "the model starts with a Rescaling/Normalization layer"
    return "unit", "assumed x/255: not a recognised keras.applications model (set --preprocess)"
