"""Method registry: a dict and a decorator. ``nnssl_pretrain -m NAME`` looks names up here, and so do the
fine-tuning trainers and ``nnssl_import_encoder``: each method names the nnU-Net trainer that fine-tunes it."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from typing import Any, Callable, TypeVar

from nnssl.errors import NnsslError
from nnssl.methods.base import FAMILIES, SSLMethod
from nnssl.networks.swin import SwinEncoder
from nnssl.plans import did_you_mean

METHODS: dict[str, type[SSLMethod]] = {}
_NOT_METHOD_MODULES = {"base", "registry"}
M = TypeVar("M", bound=type[SSLMethod])


def register_method(name: str, trainer: str) -> Callable[[M], M]:
    """Class decorator: ``@register_method("dino", trainer="SwinUNETR_DINO_Trainer")`` makes the class available
    as ``-m dino`` and its encoders fine-tunable with ``nnUNetv2_train ... -tr SwinUNETR_DINO_Trainer``."""

    def decorate(cls: M) -> M:
        if cls.family not in FAMILIES:
            raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}, got {cls.family!r}")
        if name in METHODS and METHODS[name] is not cls:
            warnings.warn(f"SSL method '{name}' registered twice; {cls.__name__} replaces {METHODS[name].__name__}")
        cls.name, cls.trainer = name, trainer
        METHODS[name] = cls
        return cls

    return decorate


def _import_method_modules() -> None:
    import nnssl.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_METHOD_MODULES:
            importlib.import_module(f"nnssl.methods.{module.name}")


def list_methods() -> list[str]:
    _import_method_modules()
    return sorted(METHODS)


def trainer_names() -> dict[str, str]:
    """Method -> the name of the nnU-Net trainer class that fine-tunes its encoders."""
    return {name: METHODS[name].trainer for name in list_methods()}


def get_method(name: str) -> type[SSLMethod]:
    names = list_methods()
    if name not in METHODS:
        raise NnsslError(f"Unknown SSL method '{name}'.{did_you_mean(name, names)} "
                         f"Known methods: {', '.join(names)} (see: nnssl_pretrain --list-methods).")
    return METHODS[name]


def method_defaults(name: str) -> dict[str, Any]:
    """The method's hyperparameters and their defaults, read from its constructor signature."""
    parameters = list(inspect.signature(get_method(name).__init__).parameters.values())[2:]  # self, encoder
    return {p.name: p.default for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY}


def build_method(name: str, encoder: SwinEncoder, **hyperparameters: Any) -> SSLMethod:
    """Instantiate method ``name`` around ``encoder``; a hyperparameter it does not take is an error."""
    valid = method_defaults(name)
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise NnsslError(f"Method '{name}' has no hyperparameter(s) {unknown}. Valid: {sorted(valid)} "
                         f"(set them under \"method\" in plans/pretrain/{name}.json or with --plans-override).")
    return get_method(name)(encoder, **hyperparameters)
