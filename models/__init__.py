"""The model zoo: PyTorch only. Importing this package registers every family."""
from ._registry import ModelCfg, UnknownModelError, create_model, get_model_cfg, list_models, register_model
from . import convmixer, cyclemlp, gmlp, mlp_mixer, resmlp  # noqa: F401  (registers the variants)

__all__ = ["ModelCfg", "UnknownModelError", "create_model", "get_model_cfg", "list_models", "register_model"]
