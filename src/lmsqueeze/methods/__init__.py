"""Methods: configs, the registry, artifacts. Importing this package registers every built-in method."""

from lmsqueeze.methods.base import METHODS, Artifact, Method, get_method, load_artifact, register_method
from lmsqueeze.methods.dense import Dense


def _register_builtin() -> None:
    """Import the method packages so their @register_method decorators run (no triton, no GPU work)."""
    import importlib

    for module in ("kvquant", "chess", "squeezed", "a2ats", "baselines", "baselines.cats", "baselines.teal",
                   "baselines.quest", "baselines.streaming", "baselines.snapkv", "baselines.random_select",
                   "baselines.oracle_topk"):
        importlib.import_module(f"lmsqueeze.methods.{module}")


_register_builtin()

__all__ = ["METHODS", "Artifact", "Dense", "Method", "get_method", "load_artifact", "register_method"]
