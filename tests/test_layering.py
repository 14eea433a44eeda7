"""The package's shape, checked from its source with ``ast``.

* Imports point one way: every module of ``gmemfast`` has a rank in :data:`LAYERS` and may
  import only modules of a lower rank (imports inside functions count too), so there is
  no import cycle, hidden or not.
* No module imports another module's underscore names, and no code reaches into another
  object's underscore attributes (``x._name`` where ``x`` is not ``self`` or ``cls``),
  an argparse namespace included. Underscore *modules* of the package (``_kernels``,
  ``_layout``, ``_store``) are its internals and may be imported by its modules.
* No module but ``_kernels.py`` is over 800 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gmemfast"

# Lowest first. A module may import only modules listed before it.
LAYERS = [
    "version",
    "uapi",
    "errors",
    "units",
    "_layout",
    "report",
    "_kernels",
    "_warm",
    "_store",
    "persist",
    "gmem",
    "populate",
    "platforms",
    "platforms.measure",
    "platforms.vmsa",
    "platforms.snp",
    "platforms.tdx",
    "firmware",
    "vm",
    "launch",
    "memory",
    "cost",
    "wallclock",
    "trace",
    "importers",
    "scenarios.params",
    "scenarios.results",
    "scenarios.vmm",
    "scenarios.runner",
    "scenarios.workloads",
    "scenarios.swiotlb",
    "scenarios.swiotlb_io",
    "scenarios.builtin",
    "scenarios.files",
    "scenarios.running",
    "scenarios",
    "plot",
    "sweep",
    "",            # gmemfast/__init__.py
    "bench.baselines",
    "bench.workloads",
    "bench.targets",
    "bench.cli",
    "bench",
    "cli",
    "__main__",
]
RANK = {name: i for i, name in enumerate(LAYERS)}
MAX_LINES = 800
EXEMPT_FROM_LENGTH = {"_kernels"}


def _modules():
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool):
    """The package-relative module names an import statement refers to."""
    names = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "gmemfast" or alias.name.startswith("gmemfast."):
                names.append((alias.name[len("gmemfast."):] if "." in alias.name else "", None))
        return names
    if node.level == 0:
        if not (node.module == "gmemfast" or (node.module or "").startswith("gmemfast.")):
            return []
        base = node.module[len("gmemfast."):] if "." in node.module else ""
    else:
        pkg = module.split(".") if module else []
        if not is_package:
            pkg = pkg[:-1]
        up = node.level - 1
        pkg = pkg[:len(pkg) - up] if up else pkg
        base = ".".join(pkg + ([node.module] if node.module else []))
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        if sub in MODULES:
            names.append((sub, None))          # ``from . import vm``: the module itself
        else:
            names.append((base, alias.name))   # ``from .vm import VM``: a name of the module
    return names


def _imports(module: str, path: Path):
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target, name in _resolve(module, node, is_package):
                yield node.lineno, target, name


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if m not in RANK)
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    bad = []
    for line, target, _name in _imports(module, MODULES[module]):
        if target not in RANK:
            bad.append(f"line {line}: imports unknown module {target!r}")
        elif target != module and RANK[target] >= RANK[module]:
            bad.append(f"line {line}: imports {target or 'gmemfast'!r}, which is not below it")
    assert not bad, f"{module}: " + "; ".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_underscore_names_from_other_modules(module):
    bad = []
    for line, target, name in _imports(module, MODULES[module]):
        if name is not None and name.startswith("_") and not _is_dunder(name) and target != module:
            bad.append(f"line {line}: imports {name} from {target or 'gmemfast'}")
    assert not bad, f"{module}: " + "; ".join(bad)


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_reaching_into_other_objects(module):
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or _is_dunder(attr):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, f"{module} reaches into underscore attributes: " + "; ".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_length(module):
    if module in EXEMPT_FROM_LENGTH:
        return
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (at most {MAX_LINES}); split it"


def test_the_checks_can_fail(tmp_path):
    """The parsers above see what they must: a relative import upward, an underscore
    name, and an attribute reach-in are all found in a small made-up module."""
    src = ("from ..cli import main\n"
           "from ..gmem import _private\n"
           "def f(g, args):\n    return g._n2, args._run, self._ok\n")
    tree = ast.parse(src)
    found = [t for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for t in _resolve("platforms.snp", node, False)]
    assert found == [("cli", "main"), ("gmem", "_private")]
    reach = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and n.attr.startswith("_") and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert sorted(reach) == ["args._run", "g._n2"]
