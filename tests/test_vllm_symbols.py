"""Every vLLM symbol the plugin touches (docs/vllm.md) still resolves in the installed vLLM.

The table in docs/vllm.md lists each name with its kind and upstream file; a row that no longer
resolves, or a class/function/method that moved to another file, fails here, and so does a
vLLM name imported by ``testbed/vllm_backend/*.py`` that the table does not list.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "vllm.md"
PLUGIN_DIR = ROOT / "testbed" / "vllm_backend"
SECTION = "## Every vLLM symbol the plugin touches"
COLUMNS = ["symbol", "kind", "used in", "upstream definition", "note"]
KINDS = {"class", "function", "object", "method", "method we override", "property", "attribute"}
MEMBER_KINDS = {"method", "method we override", "property", "attribute"}
VLLM_DIR = Path(vllm.__file__).resolve().parent


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _untick(cell: str) -> str:
    return cell.strip().strip("`").strip()


def doc_rows() -> list[dict[str, str]]:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    lines = text.split(SECTION, 1)[1].splitlines()
    table = []
    for line in lines:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append(line)
        elif table:
            break  # the first table of the section only
    assert table, "the symbol table is missing"
    header = _cells(table[0])
    assert header == COLUMNS, header
    assert set(table[1].replace("|", "").strip()) <= set("-: "), table[1]
    rows = []
    for line in table[2:]:
        cells = _cells(line)
        assert len(cells) == len(COLUMNS), f"row has {len(cells)} cells: {line}"
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


ROWS = doc_rows()


def row_id(row: dict[str, str]) -> str:
    return _untick(row["symbol"])


def resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not name.startswith(exc.name):
                raise  # a dependency of the module is missing, not the module itself
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def defining_class(owner, name: str) -> type | None:
    """The class in ``owner``'s MRO that has ``name`` as a class attribute, an annotated field
    (dataclass, msgspec, TypedDict) or an attribute its source assigns (``self.name = ...``)."""
    assigned = re.compile(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]*)?=(?!=)")
    classes = owner.__mro__ if inspect.isclass(owner) else type(owner).__mro__
    for cls in classes:
        if name in vars(cls) or name in vars(cls).get("__annotations__", {}):
            return cls
        if cls.__module__.startswith("vllm") and assigned.search(_source(cls)):
            return cls
    return None


def defined_methods(path: Path) -> set[str]:
    """Names of the methods the classes of a plugin file define."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        item.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        for item in node.body
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def _file(obj) -> Path:
    return Path(inspect.getfile(inspect.unwrap(obj))).resolve()


def _check_file(obj, documented: Path, symbol: str) -> None:
    actual = _file(obj)
    assert actual == documented, f"{symbol} is defined in {actual.relative_to(VLLM_DIR.parent)}"


def test_table_is_not_empty():
    assert len(ROWS) > 0
    symbols = [row_id(r) for r in ROWS]
    assert len(symbols) == len(set(symbols)), "duplicate rows"


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_symbol_resolves(row):
    symbol, kind = row_id(row), row["kind"].strip()
    assert symbol.split(".")[0] == "vllm", symbol
    assert kind in KINDS, f"{symbol}: unknown kind {kind!r}"
    used_in = [_untick(f) for f in row["used in"].split(",")]
    for name in used_in:
        assert (PLUGIN_DIR / name).is_file(), f"{symbol}: no plugin file {name}"
    upstream = _untick(row["upstream definition"])
    assert upstream.startswith("vllm/"), upstream
    documented = (VLLM_DIR.parent / upstream).resolve()
    assert documented.is_file(), f"{symbol}: {upstream} is not in the installed vLLM"

    if kind not in MEMBER_KINDS:
        obj = resolve(symbol)
        if kind == "class":
            assert inspect.isclass(obj), f"{symbol} is not a class"
            _check_file(obj, documented, symbol)
        elif kind == "function":
            assert inspect.isfunction(inspect.unwrap(obj)), f"{symbol} is not a function"
            _check_file(obj, documented, symbol)
        return

    owner_path, _, name = symbol.rpartition(".")
    owner = resolve(owner_path)
    if kind in ("method", "method we override"):
        assert hasattr(owner, name), f"{symbol} does not exist"
        assert callable(getattr(owner, name)), f"{symbol} is not callable"
        _check_file(getattr(owner, name), documented, symbol)
        if kind == "method we override":
            assert any(name in defined_methods(PLUGIN_DIR / f) for f in used_in), (
                f"{symbol}: no class in {used_in} overrides {name}"
            )
    elif kind == "property":
        assert isinstance(inspect.getattr_static(owner, name, None), property), (
            f"{symbol} is not a property"
        )
        _check_file(inspect.getattr_static(owner, name).fget, documented, symbol)
    else:
        cls = defining_class(owner, name)
        assert cls is not None, f"{symbol}: no class in the MRO of {owner_path} defines {name}"
        _check_file(cls, documented, symbol)


def plugin_vllm_names() -> dict[str, str]:
    """Each vLLM name a plugin file imports or reads off ``import vllm``: name -> file."""
    names = {}
    for path in sorted(PLUGIN_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = set()  # what `import vllm` / `import vllm as x` bound
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "vllm" or node.module.startswith("vllm."):
                    for alias in node.names:
                        names[f"{node.module}.{alias.name}"] = path.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "vllm":
                        aliases.add(alias.asname or "vllm")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                names[f"vllm.{node.attr}"] = path.name
    return names


def test_plugin_finds_vllm_imports():
    names = plugin_vllm_names()  # the AST walk itself: it must see the known imports
    assert "vllm.model_executor.models.llama.LlamaForCausalLM" in names
    assert "vllm.ModelRegistry" in names  # imported inside a function
    assert "vllm.LLM" in names  # an attribute of `import vllm`


def test_every_plugin_import_is_listed():
    listed = {row_id(r) for r in ROWS}
    missing = {name: f for name, f in plugin_vllm_names().items() if name not in listed}
    assert not missing, f"vLLM names used by the plugin without a row in {DOC.name}: {missing}"
