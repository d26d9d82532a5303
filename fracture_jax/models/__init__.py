"""Keras applications ported to Flax: EfficientNet B0-B7, ResNet50, VGG16."""

from fracture_jax.models.classifier import FractureClassifier, backbone_layers
from fracture_jax.models.registry import MODELS, ModelSpec, get_spec

__all__ = ["FractureClassifier", "backbone_layers", "MODELS", "ModelSpec", "get_spec"]
