"""Continual-learning methods, one module each, behind ``ContinualMethod``, and the one registry of them.

``REGISTRY`` maps each method's name to its class (``module:Class`` in this package), imported only when asked for,
so the command line can list and check method names without importing torch. Everything else (the config's
choices, the dry run, the memory estimate, compare, results, resuming) asks this module; what a method needs
there, it declares on its class (``ContinualMethod``'s class attributes and ``plan_*`` class methods).

Adding a method = one new file in this package + one line in ``REGISTRY`` (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib

from ..config import ConfigError, TrainConfig

REGISTRY: dict[str, str] = {
    "seq_lora": "seq_lora:SeqLoRA",
    "deal": "deal:DEAL",
    "o_lora": "o_lora:OLoRA",
    "per_task": "per_task:PerTaskFT",
    "replay": "replay:Replay",
    "ewc": "ewc:EWC",
    "lwf": "lwf:LwF",
    "osf": "osf:OSF",
}
"""Method name (the ``method`` config value) -> ``module:Class`` in ``deal_train.methods``."""

METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)
"""Every method name, in registration order."""


def method_class(name: str) -> type:
    """The class registered as ``name``.

    Raises:
        ConfigError: unknown method name (``check_method_name``'s message).
    """
    check_method_name(name)
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def check_method_name(name: str) -> None:
    """Raises ``ConfigError`` naming the registered methods when ``name`` is not one of them."""
    if name not in REGISTRY:
        raise ConfigError(f"Config key 'method' = {name!r} is not one of {list(REGISTRY)}.")


def get_method(cfg: TrainConfig):
    """Instantiate the method named by ``cfg.method``.

    Raises:
        ConfigError: unknown method name.
    """
    return method_class(cfg.method)(cfg)


def methods_with(attribute: str) -> list[str]:
    """Names of the registered methods whose class sets ``attribute`` true (e.g. ``"oracle"``), in order."""
    return [m for m in METHOD_NAMES if getattr(method_class(m), attribute)]


def method_with_role(role: str) -> str:
    """The one method whose class declares ``results_role == role`` (``"proposed"``: the method the results page
    judges; ``"plain"``: the plain LoRA baseline it is set against).

    Raises:
        LookupError: no method, or several, declare that role.
    """
    found = [m for m in METHOD_NAMES if method_class(m).results_role == role]
    if len(found) != 1:
        raise LookupError(f"{len(found)} methods declare results_role {role!r}; exactly one must.")
    return found[0]


def is_foreign_key(key: str, method: str | None) -> bool:
    """Whether config ``key`` is read only by a registered method other than ``method`` (its ``config_prefix`` or
    ``config_keys``); ``method=None``: by any method. Such keys do not make two runs of ``method`` differ."""
    for name in METHOD_NAMES:
        cls = method_class(name)
        if name != method and ((cls.config_prefix and key.startswith(cls.config_prefix)) or key in cls.config_keys):
            return True
    return False


_CLASSES = {spec.split(":")[1]: name for name, spec in REGISTRY.items()}


def __getattr__(attr: str):
    """``METHODS`` (name -> class), ``ContinualMethod`` and every method class, imported on first use."""
    if attr == "METHODS":
        return {name: method_class(name) for name in METHOD_NAMES}
    if attr == "ContinualMethod":
        from .base import ContinualMethod

        return ContinualMethod
    if attr in _CLASSES:
        return method_class(_CLASSES[attr])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["METHODS", "METHOD_NAMES", "REGISTRY", "ContinualMethod", "DEAL", "EWC", "LwF", "OLoRA", "OSF", "PerTaskFT",
           "Replay", "SeqLoRA", "check_method_name", "get_method", "is_foreign_key", "method_class",
           "method_with_role", "methods_with"]
