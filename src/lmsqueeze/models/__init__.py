"""Model loading, family adapters, attention patching, rope helpers."""

from lmsqueeze.models.families import SUPPORTED_ARCHITECTURES
from lmsqueeze.models.loading import default_model_path, load_model

__all__ = ["SUPPORTED_ARCHITECTURES", "default_model_path", "load_model"]
