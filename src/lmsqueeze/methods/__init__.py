"""Methods: configs, the registry, artifacts."""

from lmsqueeze.methods.base import METHODS, Artifact, Method, get_method, load_artifact, register_method
from lmsqueeze.methods.dense import Dense

__all__ = ["METHODS", "Artifact", "Dense", "Method", "get_method", "load_artifact", "register_method"]
