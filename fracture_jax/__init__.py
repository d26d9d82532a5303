"""fracture_jax: fine-tune ImageNet-pretrained Keras backbones in JAX to classify bone X-rays."""

__version__ = "0.1.0"
