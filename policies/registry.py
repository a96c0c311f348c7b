"""Policy lookup by (kind, name): the built-ins plus third-party classes from entry points.

A third-party package registers a policy class in the `testbed.policies` entry-point group, e.g.

    [project.entry-points."testbed.policies"]
    mypolicy = "mypkg.policies:MyBatching"

The class needs `kind` ("exit_rule", "batching" or "kv_fill") and `name` class attributes.
There is no module-global table: each Registry reads the entry points the first time it needs
them, so a plugin that fails to import only breaks lookups that reach it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from policies import batching
from policies.errors import PolicyConfigError, UnknownPolicyError
from policies.exit_rules import EXIT_RULES
from policies.kv_fill import KV_FILL_POLICIES
from policies.rebatch import RebatchBatching

ENTRY_POINT_GROUP = "testbed.policies"
# the built-in batching policies; rebatch, which parks rows across steps, has its own module
BATCHING_POLICIES: tuple[type[batching.BatchingPolicy], ...] = (
    batching.FullBatching,
    batching.ConsensusBatching,
    batching.QuorumBatching,
    batching.ShrinkBatching,
    RebatchBatching,
    batching.SkipDecodeBatching,
)
KINDS = ("batching", "exit_rule", "kv_fill")
_KIND_LABELS = {
    "batching": "batching policy",
    "exit_rule": "exit rule",
    "kv_fill": "KV-fill policy",
}

PolicyTable = dict[str, dict[str, type]]  # kind -> name -> class


class EntryPointLike(Protocol):
    """The part of importlib.metadata.EntryPoint the registry uses."""

    name: str
    value: str

    def load(self) -> Any: ...


def builtin_policies() -> PolicyTable:
    """A fresh table of the built-in policy classes."""
    groups = {"batching": BATCHING_POLICIES, "exit_rule": EXIT_RULES, "kv_fill": KV_FILL_POLICIES}
    return {kind: {cls.name: cls for cls in classes} for kind, classes in groups.items()}


def discover_entry_points() -> Iterable[EntryPointLike]:
    # Looked up on the module at call time, so tests can monkeypatch importlib.metadata.
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry_point(entry_point: EntryPointLike) -> type:
    where = f"policy entry point '{entry_point.name}' ({entry_point.value})"
    try:
        loaded = entry_point.load()
    except Exception as exc:  # any import-time failure of third-party code
        raise PolicyConfigError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
    kind = getattr(loaded, "kind", None)
    name = getattr(loaded, "name", None)
    if not isinstance(loaded, type) or kind not in KINDS or not isinstance(name, str) or not name:
        raise PolicyConfigError(
            f"{where} must load a class with a string `name` and a `kind` in {', '.join(KINDS)}"
        )
    return loaded


def load_plugins(entry_points: Iterable[EntryPointLike], builtins: PolicyTable) -> PolicyTable:
    """Load every entry point; a name that clashes with a built-in or another plugin is an error."""
    plugins: PolicyTable = {kind: {} for kind in KINDS}
    for entry_point in entry_points:
        cls = _load_entry_point(entry_point)
        if cls.name in builtins[cls.kind] or cls.name in plugins[cls.kind]:
            raise PolicyConfigError(
                f"policy entry point '{entry_point.name}' ({entry_point.value}) reuses the "
                f"{_KIND_LABELS[cls.kind]} name '{cls.name}'"
            )
        plugins[cls.kind][cls.name] = cls
    return plugins


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownPolicyError(f"unknown policy kind '{kind}' (known: {', '.join(KINDS)})")


class Registry:
    """Built-in and entry-point policies; entry points are read once, on first need."""

    def __init__(
        self, find_entry_points: Callable[[], Iterable[EntryPointLike]] = discover_entry_points
    ) -> None:
        self._find_entry_points = find_entry_points
        self._builtins = builtin_policies()
        self._plugins: PolicyTable | None = None  # filled on first lookup beyond the built-ins

    def _plugin_table(self) -> PolicyTable:
        if self._plugins is None:
            self._plugins = load_plugins(self._find_entry_points(), self._builtins)
        return self._plugins

    def available(self, kind: str) -> tuple[str, ...]:
        """Sorted names of every policy of `kind`, third-party ones included."""
        _check_kind(kind)
        return tuple(sorted({**self._builtins[kind], **self._plugin_table()[kind]}))

    def policy_class(self, kind: str, name: str) -> type:
        _check_kind(kind)
        # Built-in names cannot be taken by plugins, so they need no entry-point import.
        if name in self._builtins[kind]:
            return self._builtins[kind][name]
        plugins = self._plugin_table()[kind]
        if name not in plugins:
            raise UnknownPolicyError(
                f"unknown {_KIND_LABELS[kind]} '{name}' (known: {', '.join(self.available(kind))})"
            )
        return plugins[name]

    def create(self, kind: str, name: str, **params: Any) -> Any:
        """An instance of policy `name` of `kind`, built from `params`."""
        cls = self.policy_class(kind, name)
        accepted = tuple(inspect.signature(cls).parameters)
        where = f"{_KIND_LABELS[kind]} '{name}'"
        unexpected = sorted(set(params) - set(accepted))
        if unexpected:
            raise PolicyConfigError(
                f"{where}: unexpected parameter(s) {', '.join(unexpected)} "
                f"(parameters: {', '.join(accepted) or 'none'})"
            )
        for key, value in params.items():
            _check_type(where, cls, key, value)
        try:
            return cls(**params)
        except TypeError as exc:  # a missing parameter, or a value of the wrong type
            raise PolicyConfigError(
                f"{where}: {exc} (parameters: {', '.join(accepted) or 'none'})"
            ) from exc


_NUMBER_KINDS = {int: (int,), float: (int, float)}  # an int is a fine float, never the reverse


def _check_type(where: str, cls: type, key: str, value: Any) -> None:
    """A number parameter given text (``fraction=abc``) gets its name in the message, not
    Python's comparison error from deep inside the policy."""
    try:
        hint = typing.get_type_hints(cls).get(key)
    except (NameError, TypeError):  # an annotation this module cannot resolve: let cls decide
        return
    accepted = _NUMBER_KINDS.get(hint)
    if accepted is not None and (isinstance(value, bool) or not isinstance(value, accepted)):
        kind = "a whole number" if hint is int else "a number"
        raise PolicyConfigError(f"{where}: {key} must be {kind}, got {value!r}")


def available(kind: str) -> tuple[str, ...]:
    """Names of the policies of `kind` ("exit_rule", "batching" or "kv_fill")."""
    return Registry().available(kind)


def create(kind: str, name: str, **params: Any) -> Any:
    """Build policy `name` of `kind`; UnknownPolicyError or PolicyConfigError on bad input."""
    return Registry().create(kind, name, **params)
