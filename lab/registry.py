"""Name -> class registries: how a config string becomes a module.

A config names its components (``mlp_class_name="GatedMLP"``); the model looks the
name up here.  Registering your own class under a new name is all it takes to build
it from a config, mix it per layer, or pick it in the Composer widget::

    from lab.registry import attention

    @attention.register("my-attention")
    class MyAttention(CausalSelfAttention): ...

    GPT(Config(attention_class_name="my-attention", ...))
"""

from __future__ import annotations

import copy
import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from lab.errors import ConfigError

T = TypeVar("T")


class Registry:
    """A named collection of classes of one kind (attention, mlp, norm, ...)."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field  # the Config field that names a member, for error messages
        self._classes: dict[str, type] = {}

    def register(self, name: str | None = None, cls: type | None = None) -> Any:
        """Register ``cls`` under ``name`` (default: the class name).

        Usable as ``registry.register("name", cls)``, ``@registry.register("name")``
        or ``@registry.register()``. Re-registering a name replaces the old class, so a
        notebook cell can be re-run while a component is being developed.
        """

        def add(klass: type[T]) -> type[T]:
            self._classes[name or klass.__name__] = klass
            return klass

        return add(cls) if cls is not None else add

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(
                field=self.field,
                message=f"{self.field} ({name!r}) is not a registered {self.kind}; "
                f"choose one of {self.names()} or register yours with "
                f"lab.registry.{self.kind}.register({name!r}, YourClass)",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


attention = Registry("attention", "attention_class_name")
mlp = Registry("mlp", "mlp_class_name")
norm = Registry("norm", "norm_class_name")
block = Registry("block", "block_class_name")
positional = Registry("positional", "positional")
activation = Registry("activation", "activation")  # name -> function, e.g. "silu"

REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (attention, mlp, norm, block, positional, activation)
}


def register(kind: str, name: str | None = None, cls: type | None = None) -> Any:
    """``lab.register("mlp", "my-mlp", MyMLP)``: register into the registry of ``kind``."""
    if kind not in REGISTRIES:
        raise ValueError(f"unknown registry {kind!r}; choose one of {sorted(REGISTRIES)}")
    return REGISTRIES[kind].register(name, cls)


def build(cls: Callable[..., T], config: Any, block_idx: int) -> T:
    """Instantiate ``cls(config, block_idx=block_idx)``, or ``cls(config)`` for classes
    written like the guide's ``CustomBlock(config)`` that take no layer index."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a builtin or C class: no signature to read
        return cls(config, block_idx=block_idx)
    takes_index = "block_idx" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    return cls(config, block_idx=block_idx) if takes_index else cls(config)


# --- named architectures ---------------------------------------------------------------
# name -> Config field values, plus metadata keys. ``lab.configs`` fills it with the
# published architectures (and ``register_config`` adds yours); ``Config.from_name``
# reads it, so the config module needs no import of the catalogue.
named_configs: dict[str, dict[str, Any]] = {}
METADATA_KEYS = ("hf_config", "published_params")


def named_config(name: str) -> dict[str, Any]:
    """The ``Config`` field values of the architecture ``name`` (a fresh copy, metadata
    such as ``hf_config`` removed).  Unknown names raise ``ConfigError`` with the
    closest known names."""
    entry = copy.deepcopy(known_config(name))
    for key in METADATA_KEYS:
        entry.pop(key, None)
    return entry


def known_config(name: str) -> dict[str, Any]:
    """The stored entry of ``name`` (metadata included); ``ConfigError`` if unknown."""
    if name in named_configs:
        return named_configs[name]
    by_lower = {known.lower(): known for known in named_configs}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=5, cutoff=0.5)
    message = f"unknown model name {name!r}"
    if close:
        message += f"; did you mean {', '.join(repr(by_lower[c]) for c in close)}?"
    else:
        message += "."
    raise ConfigError(
        f"{message} Config.available() lists all {len(named_configs)} names; "
        f"register_config(name={name!r}, ...) adds one",
        field="name",
    )
