"""lmsqueeze: fast and small long-context LLM inference on Hugging Face models."""

from lmsqueeze import methods
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.methods.base import Artifact, load_artifact
from lmsqueeze.models.loading import default_model_path, load_model
from lmsqueeze.generation import generate
from lmsqueeze.session import Session, apply

__version__ = "0.1.0"
__all__ = ["Artifact", "LmsqueezeError", "Session", "apply", "default_model_path", "generate", "load_artifact",
           "load_model", "methods"]
