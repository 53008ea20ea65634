"""Models: the decoder-only LM, its layers and token mixers."""

from jaxlab.models.config import ModelConfig, RopeScaling
from jaxlab.models.transformer import LM, count_params

__all__ = ["LM", "ModelConfig", "RopeScaling", "count_params"]
