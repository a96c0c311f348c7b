"""Policy registry: built-ins, error messages and third-party entry points."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest

from policies import (
    ENTRY_POINT_GROUP,
    KINDS,
    BatchingPolicy,
    ConsensusBatching,
    PolicyConfigError,
    QuorumBatching,
    Registry,
    SoftmaxMarginRule,
    UnknownPolicyError,
    available,
    create,
)
from policies.kv_fill import Resolve


@dataclass(frozen=True)
class EveryOtherBatching(BatchingPolicy):
    """A stand-in third-party policy."""

    period: int = 2

    name: ClassVar[str] = "every_other"


@dataclass(frozen=True)
class FakeEntryPoint:
    name: str
    value: str
    target: object = None
    error: Exception | None = None

    def load(self):
        if self.error is not None:
            raise self.error
        return self.target


def _registry(*entry_points) -> Registry:
    return Registry(find_entry_points=lambda: list(entry_points))


def test_builtin_names():
    assert available("batching") == (
        "consensus",
        "full",
        "quorum",
        "rebatch",
        "shrink",
        "skipdecode",
    )
    assert available("exit_rule") == ("classifier", "hidden", "softmax")
    assert available("kv_fill") == ("copy", "lazy", "recompute", "skip")


def test_every_builtin_has_its_kind_and_name():
    registry = _registry()
    for kind in KINDS:
        for name in registry.available(kind):
            cls = registry.policy_class(kind, name)
            assert (cls.kind, cls.name) == (kind, name)


def test_create_builds_instances_with_params():
    assert create("batching", "quorum", fraction=0.5) == QuorumBatching(fraction=0.5)
    assert create("batching", "consensus") == ConsensusBatching()
    rule = create("exit_rule", "softmax", threshold=0.9, decay_tau=4.0)
    assert rule == SoftmaxMarginRule(threshold=0.9, decay_tau=4.0)
    assert create("kv_fill", "lazy").resolve is Resolve.DEEP


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownPolicyError) as info:
        create("batching", "foo")
    assert str(info.value) == (
        "unknown batching policy 'foo' "
        "(known: consensus, full, quorum, rebatch, shrink, skipdecode)"
    )
    with pytest.raises(UnknownPolicyError, match="known: copy, lazy, recompute, skip"):
        create("kv_fill", "foo")


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(UnknownPolicyError, match="known: batching, exit_rule, kv_fill"):
        available("scheduler")
    assert issubclass(UnknownPolicyError, PolicyConfigError)
    assert issubclass(PolicyConfigError, ValueError)


def test_unexpected_parameter_is_named():
    with pytest.raises(PolicyConfigError, match=r"unexpected parameter\(s\) frac.*fraction"):
        create("batching", "quorum", frac=0.5)


def test_missing_parameter_and_bad_value_are_config_errors():
    with pytest.raises(PolicyConfigError, match="fraction"):
        create("batching", "quorum")
    with pytest.raises(PolicyConfigError, match="threshold"):
        create("exit_rule", "hidden", threshold=3.0)


def test_third_party_policy_is_found_and_created():
    registry = _registry(FakeEntryPoint("every_other", "plugin:EveryOther", EveryOtherBatching))
    assert "every_other" in registry.available("batching")
    assert registry.create("batching", "every_other", period=3) == EveryOtherBatching(period=3)


def test_module_functions_read_the_entry_point_group(monkeypatch):
    module = types.ModuleType("eetb_fake_plugin")
    module.EveryOtherBatching = EveryOtherBatching
    monkeypatch.setitem(sys.modules, "eetb_fake_plugin", module)
    real = importlib.metadata.EntryPoint(
        name="every_other", value="eetb_fake_plugin:EveryOtherBatching", group=ENTRY_POINT_GROUP
    )
    seen_groups = []

    def fake_entry_points(*, group):
        seen_groups.append(group)
        return [real]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert create("batching", "every_other") == EveryOtherBatching()
    assert seen_groups == [ENTRY_POINT_GROUP]


def test_builtins_do_not_import_entry_points():
    broken = FakeEntryPoint("broken", "nowhere:Thing", error=ImportError("no module 'nowhere'"))
    assert _registry(broken).create("batching", "shrink").name == "shrink"


def test_broken_entry_point_is_reported_by_name():
    broken = FakeEntryPoint("broken", "nowhere:Thing", error=ImportError("no module 'nowhere'"))
    with pytest.raises(PolicyConfigError, match="'broken' \\(nowhere:Thing\\) failed to load"):
        _registry(broken).available("batching")


@pytest.mark.parametrize("target", [object(), types.SimpleNamespace(name="x", kind="planner")])
def test_entry_point_without_name_and_kind_is_rejected(target):
    with pytest.raises(PolicyConfigError, match="'odd'.*`name`"):
        _registry(FakeEntryPoint("odd", "m:odd", target)).available("kv_fill")


def test_entry_point_cannot_take_a_builtin_name():
    @dataclass(frozen=True)
    class FakeShrink(BatchingPolicy):
        name: ClassVar[str] = "shrink"

    with pytest.raises(PolicyConfigError, match="'evil'.*reuses.*'shrink'"):
        _registry(FakeEntryPoint("evil", "m:FakeShrink", FakeShrink)).available("batching")
