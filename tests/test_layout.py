"""The layout's rules (docs/DESIGN.md §2), checked on the source itself.

Imports run one way, cli → pipeline (and integrations, beside it) → train → loss →
tisdpo_kernels, with no cycle (counting imports inside functions too); the two kernel
backends never import each other or the reference; no module of tisdpo/ imports another's
private name; every ``*.md`` a docstring or comment names exists; no source file is longer
than 500 lines.
"""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tisdpo", "tisdpo_kernels")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module imported, name imported or "") of every import statement, nested ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
    return out


def _edges(name: str) -> set[str]:
    """The project modules ``name`` imports."""
    found = set()
    for mod, item in _imports(MODULES[name]):
        if f"{mod}.{item}" in MODULES:
            found.add(f"{mod}.{item}")
        elif mod in MODULES:
            found.add(mod)
    return found - {name}


def _layer(name: str) -> int:
    for prefix, rank in (("tisdpo.cli", 4), ("tisdpo.pipeline", 3), ("tisdpo.integrations", 3),
                         ("tisdpo.train", 2), ("tisdpo_kernels", 0), ("tisdpo", 1)):
        if name == prefix or name.startswith(prefix + "."):
            return rank
    raise AssertionError(name)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(_edges(node)):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):]
                                                                   + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [])


def test_imports_run_one_way():
    """A module imports only its own layer or those below (tisdpo/__init__ exposes the loss)."""
    for name in MODULES:
        for dep in _edges(name):
            if name == "tisdpo" or (name.startswith("tisdpo.") and dep.startswith(name)):
                continue
            assert _layer(dep) <= _layer(name), f"{name} (layer {_layer(name)}) imports " \
                                                f"{dep} (layer {_layer(dep)})"


@pytest.mark.parametrize("backend,other", [("_torch", "_triton"), ("_triton", "_torch")])
def test_backends_import_neither_each_other_nor_the_reference(backend, other):
    for name in MODULES:
        if name.startswith(f"tisdpo_kernels.{backend}"):
            bad = {d for d in _edges(name) if d.startswith(f"tisdpo_kernels.{other}")
                   or d == "tisdpo_kernels.reference"}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_no_private_name_crosses_tisdpo_modules():
    for name, path in MODULES.items():
        if not name.startswith("tisdpo."):
            continue
        for mod, item in _imports(path):
            if not mod.startswith(PACKAGES):
                continue
            private = [p for p in mod.split(".") + ([item] if item else [])
                       if p.startswith("_") and not p.startswith("__")]
            assert not private, f"{name} imports the private {private} of {mod}"


def _prose(path: Path) -> str:
    """Docstrings and comments of a source file."""
    text = path.read_text()
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def _sources(*dirs):
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


def test_every_markdown_file_a_docstring_names_exists():
    for path in _sources(*PACKAGES, "benchmarks", "tests", "docs"):
        for ref in re.findall(r"[\w./-]*\w\.md\b", _prose(path)):
            assert (ROOT / ref).is_file() or (path.parent / ref).is_file(), \
                f"{path.relative_to(ROOT)} names {ref}, which is not in the repository"


def test_no_source_file_is_longer_than_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources(*PACKAGES, "benchmarks", "tests")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
