"""The one-way import rule of DESIGN §3, checked on the source text (nothing is imported).

policies (numpy only) <- testbed.core <- testbed.engine / sim / vllm_backend <- validate / sweep /
cli; the engine, the simulator and the vLLM backend never import each other (the records a
capture shares live in testbed.capture_records); the trace format knows no policy; analysis reads
result files through analysis/load.py and never imports the engine, the simulator or the model.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = frozenset(sys.stdlib_module_names)
FORBIDDEN_IN_CORE = (
    "torch",
    "testbed.engine",
    "testbed.sim",
    "testbed.model",
    "testbed.vllm_backend",
    "testbed.validate",
    "testbed.sweep",
    "testbed.cli",
    "testbed.commands",
)


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(source: str, package: str) -> set[str]:
    """Absolute names of every module the source imports; relative ones resolved in package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _imports(file: Path) -> set[str]:
    name = _module_name(file)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    try:
        return _imports_of(file.read_text(encoding="utf-8"), package)
    except SyntaxError as exc:
        raise AssertionError(f"{file.relative_to(REPO)} does not parse: {exc}") from exc


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _violations(folder: str, is_forbidden) -> list[str]:
    return [
        f"{file.relative_to(REPO)} imports {name}"
        for file in _files(folder)
        for name in sorted(_imports(file))
        if is_forbidden(name)
    ]


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _top(name: str) -> str:
    return name.partition(".")[0]


def test_every_module_parses():
    files = [f for folder in ("testbed", "policies", "analysis", "tests") for f in _files(folder)]
    assert files
    for file in files:
        _imports(file)  # a syntax error fails here with the file's name


def test_checker_resolves_relative_and_dotted_imports():
    source = "import torch.nn\nfrom . import queues\nfrom ..model.llama import LlamaModel\n"
    names = _imports_of(source, "testbed.core")
    assert {"torch.nn", "testbed.core.queues", "testbed.model.llama"} <= names
    assert _is_under("testbed.model.llama", FORBIDDEN_IN_CORE)
    assert _is_under("torch.nn", FORBIDDEN_IN_CORE)
    assert not _is_under("testbed.modeling", ("testbed.model",))


def test_policies_import_only_stdlib_and_numpy():
    assert _files("policies")
    allowed = STDLIB | {"numpy", "policies", "__future__"}
    assert _violations("policies", lambda name: _top(name) not in allowed) == []


def test_core_imports_no_torch_and_nothing_above_it():
    assert _files("testbed/core")
    assert _violations("testbed/core", lambda name: _is_under(name, FORBIDDEN_IN_CORE)) == []


def test_model_never_imports_engine():
    assert _files("testbed/model")
    assert _violations("testbed/model", lambda name: _is_under(name, ("testbed.engine",))) == []


@pytest.mark.parametrize("package", ["policies", "testbed", "analysis"])
def test_generic_names_resolve_to_this_repository(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == REPO / package


# The arrows between the runners (DESIGN §2: the engine and the simulator share core, never each
# other) and around the trace format, each as (folder or file, forbidden prefixes).
ARROWS = {
    "testbed/engine": ("testbed.sim", "testbed.vllm_backend"),
    "testbed/sim": ("testbed.engine", "testbed.vllm_backend", "testbed.model", "torch"),
    "testbed/vllm_backend": ("testbed.engine", "testbed.sim"),
    "testbed/trace.py": ("policies", "testbed.engine", "testbed.sim", "testbed.model", "torch"),
    "testbed/capture_records.py": ("torch", "testbed.engine", "testbed.model", "vllm"),
    "analysis": ("testbed.engine", "testbed.sim", "testbed.model", "testbed.vllm_backend", "torch"),
}


@pytest.mark.parametrize("where", sorted(ARROWS))
def test_import_arrows(where):
    files = [REPO / where] if where.endswith(".py") else _files(where)
    assert files
    found = [
        f"{file.relative_to(REPO)} imports {name}"
        for file in files
        for name in sorted(_imports(file))
        if _is_under(name, ARROWS[where])
    ]
    assert found == []


def test_analysis_reads_result_files_through_its_loader_only():
    readers = ("read_text", "read_bytes", "json.load", "read_table", "pq.", "open(")
    found = [
        f"{file.relative_to(REPO)} calls {word}"
        for file in _files("analysis")
        if file.name != "load.py"
        for word in readers
        if word in file.read_text(encoding="utf-8")
    ]
    assert found == []
