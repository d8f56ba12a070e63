"""sslbench: self-supervised image representations, generative and contrastive, compared across task types."""

__version__ = "0.1.0"
