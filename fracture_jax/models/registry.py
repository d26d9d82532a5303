"""The supported backbones and their provenance: default size, published Keras files, hashes."""

import dataclasses
from typing import Callable

import flax.linen as nn

from fracture_jax.errors import UserError
from fracture_jax.models.efficientnet import VARIANTS, EfficientNet
from fracture_jax.models.resnet import ResNet50
from fracture_jax.models.smallcnn import SmallCNN
from fracture_jax.models.vgg import VGG16

_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_EFFNET_MD5 = {  # (with top, no top), as keras.applications.efficientnet publishes them
    "b0": ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    "b1": ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    "b2": ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    "b3": ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
    "b4": ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    "b5": ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f"),
    "b6": ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743"),
    "b7": ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
}


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """One published Keras weight file: its name, URL and md5 as Keras lists them."""

    filename: str
    url: str
    md5: str


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the project knows about one backbone."""

    name: str
    default_size: int
    build: Callable[..., nn.Module]  # build(frozen=, axis_name=, dtype=, ...) -> backbone
    notop: WeightsFile | None  # the published Keras files (None: no pretrained weights)
    top: WeightsFile | None
    top_layers: tuple[str, ...]  # layers of with-top files that the backbone ignores
    keras_class: str | None = None  # its keras.applications constructor (None: not in Keras)
    keras_preprocess: str | None = None  # keras.applications module whose preprocess_input
    # the Keras model expects on RGB 0-255 (None: it takes RGB 0-255 itself)
    drops_paths: bool = False  # the backbone drops residual paths at random in training, even
    # when frozen (EfficientNet's drop-connect, as in Keras)
    std_rescaling: bool = False  # the backbone takes ``imagenet_rescaling``: Keras' extra
    # 1/sqrt(std) on its weights="imagenet" path, on when the published file is loaded


def _effnet(variant: str) -> ModelSpec:
    top_md5, notop_md5 = _EFFNET_MD5[variant]
    base = "https://storage.googleapis.com/keras-applications/"
    name = f"efficientnet{variant}"
    return ModelSpec(
        name=name, default_size=VARIANTS[variant][2],
        build=lambda **kw: EfficientNet(variant=variant, **kw),
        notop=WeightsFile(f"{name}_notop.h5", f"{base}{name}_notop.h5", notop_md5),
        top=WeightsFile(f"{name}.h5", f"{base}{name}.h5", top_md5),
        top_layers=("predictions",), keras_class=f"EfficientNet{variant.upper()}",
        drops_paths=True, std_rescaling=True)


def _published(folder: str, stem: str, top_md5: str, notop_md5: str):
    top = f"{stem}_weights_tf_dim_ordering_tf_kernels.h5"
    notop = f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return (WeightsFile(notop, f"{_KERAS}{folder}/{notop}", notop_md5),
            WeightsFile(top, f"{_KERAS}{folder}/{top}", top_md5))


_resnet_notop, _resnet_top = _published(
    "resnet", "resnet50", "2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626")
_vgg_notop, _vgg_top = _published(
    "vgg16", "vgg16", "64373286793e3c8b2b4e3219cbf3544b", "6d6bbae143d832006294945121d1f1fc")

MODELS: dict[str, ModelSpec] = {
    **{f"efficientnet{v}": _effnet(v) for v in VARIANTS},
    "resnet50": ModelSpec("resnet50", 224, lambda **kw: ResNet50(**kw), _resnet_notop, _resnet_top,
                          ("predictions",), "ResNet50", "resnet50"),
    "vgg16": ModelSpec("vgg16", 224, lambda **kw: VGG16(**kw), _vgg_notop, _vgg_top,
                       ("fc1", "fc2", "predictions"), "VGG16", "vgg16"),
    "smallcnn": ModelSpec("smallcnn", 64, lambda **kw: SmallCNN(**kw), None, None, ()),
}


def get_spec(name: str) -> ModelSpec:
    """The spec of a backbone by name; a clear error listing the known names otherwise."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[key]
