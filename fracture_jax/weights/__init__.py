"""Keras weight files: reading them into the Flax backbones, and fetching the published ones."""

from fracture_jax.weights.hub import download, fetch_published, resolve_weights
from fracture_jax.weights.keras_h5 import (WeightsError, backbone_variables, load_keras_backbone,
                                           read_layers)

__all__ = ["WeightsError", "backbone_variables", "download", "fetch_published",
           "load_keras_backbone", "read_layers", "resolve_weights"]
