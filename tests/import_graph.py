r"""The package's import graph, read statically (``ast``), and its layering rules.

  python tests/import_graph.py            # subpackage graph, cycles, violations
  python tests/import_graph.py --modules  # every module-level edge
  python tests/import_graph.py --local    # the function-local imports

Nodes are the subpackages of ``halluvit_jax`` (``layers``, ``models``, ``train``, ...) and its
top-level modules (``cli``, ``loading``, ``evaluate``, ...), which sit above them all. Only
imports executed at import time count as edges (module level, including ``try:`` and
``if TYPE_CHECKING:`` blocks); function-local imports are listed separately, and are meant
only for optional dependencies (torch, timm, tensorflow, matplotlib, onnx).

The allowed direction (docs/training.md, "Package layout")::

    {cli, layers}  <-  {checkpoint, models, reparam}  <-  loading
                   <-  {train, convert, analysis, complexity, data}  <-  evaluate, config_helpers, the __main__ CLIs

A node may import only from those to its left (:data:`RANK`); the five in braces import each
other only as :data:`ALLOWED` lists. `tests/test_layering.py` asserts this.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterator

PACKAGE = "halluvit_jax"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (this file: tests/)

# Rank of each node: a node may import nodes of a lower rank, and of its own rank only as
# ALLOWED says. Top-level modules not listed (evaluate, config_helpers) are CLIs / user-facing
# helpers above everything.
RANK = {
    "cli": 0,  # the one error convention and the config-file loader; imports nothing of ours
    "lazy": 0,  # PEP 562 lazy package names (train, data); imports nothing of ours
    "layers": 0,
    "models": 1,
    "reparam": 1,  # the cFFN fold, a pure function of variables
    "checkpoint": 1,  # checkpoint files: the one reader, tree checks; imports only cli
    "loading": 2,  # the one loader: checkpoint + models + reparam
    "train": 3, "convert": 3, "analysis": 3, "complexity": 3, "data": 3,
}
# Edges between nodes of the same rank that are part of the design.
ALLOWED = {
    ("train", "data"),  # the trainer reads the input pipeline
    ("analysis", "data"),  # CCS over an eval split
    ("convert", "data"),  # calibration batches for the hal conversion
    ("convert", "complexity"),  # model cards record params/MACs
    ("convert", "analysis"),  # the hal conversion keeps the least similar heads (analysis.similarity)
}
OPTIONAL = {"libtpu", "torch", "timm", "tensorflow", "matplotlib", "onnx", "scipy", "threadpoolctl", "tensorboardX",
            "onnxruntime", "jax2onnx", "sklearn"}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def modules() -> Iterator[tuple[str, str]]:
    """(dotted module name, file path) of every module of the package, sorted."""
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                yield module_name(path), path


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: str) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, module_level) for every import in ``path``. ``from a import b``
    yields ``a.b`` (b may be a module or a name in a)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        at_top = id(node) not in local
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, at_top
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            for alias in node.names:
                yield f"{base}.{alias.name}" if base else alias.name, node.lineno, at_top


def unit(module: str) -> str | None:
    """The node of a module of the package: its subpackage, or its own name at the top level."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) == 1:
        return None
    top = parts[1]
    return top if os.path.isdir(os.path.join(ROOT, PACKAGE, top)) or top in RANK else top


def _known(target: str, names: set[str]) -> str | None:
    """The longest module of the package that ``target`` names (``a.b.c`` -> ``a.b`` if c is a name)."""
    while target:
        if target in names:
            return target
        target = target.rpartition(".")[0]
    return None


def graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]], list[str]]:
    """(unit graph, where each unit edge comes from, function-local imports)."""
    mods = dict(modules())
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], list[str]] = {}
    local: list[str] = []
    for module, path in mods.items():
        src = unit(module)
        if src is None:
            continue
        edges.setdefault(src, set())
        for target, line, at_top in imports(module, path):
            dst_module = _known(target, set(mods)) if target.startswith(PACKAGE + ".") else None
            if not at_top:
                root = target.split(".")[0]
                local.append(f"{os.path.relpath(path, ROOT)}:{line} {target}"
                             + ("" if root not in OPTIONAL else "  (optional)"))
                continue
            if dst_module is None:
                continue
            dst = unit(dst_module)
            if dst is None or dst == src:
                continue
            edges[src].add(dst)
            where.setdefault((src, dst), []).append(f"{os.path.relpath(path, ROOT)}:{line}")
    return edges, where, local


def module_graph() -> dict[str, set[str]]:
    """Module-level imports between the package's own modules (``a.b`` -> ``a.b.c``)."""
    mods = dict(modules())
    names = set(mods)
    out: dict[str, set[str]] = {}
    for module, path in mods.items():
        out[module] = set()
        for target, _, at_top in imports(module, path):
            dst = _known(target, names) if at_top and target.startswith(PACKAGE + ".") else None
            if dst is not None and dst != module:
                out[module].add(dst)
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges against the layering: a node importing one of a higher rank, one of its own rank
    not in :data:`ALLOWED`, or a top-level module without a rank (a CLI or user-facing helper)."""
    bad = []
    for src, dsts in sorted(edges.items()):
        if src not in RANK:
            continue  # CLIs and user-facing helpers may import anything below them
        for dst in sorted(dsts):
            if dst not in RANK or RANK[dst] > RANK[src] or (
                    RANK[dst] == RANK[src] and (src, dst) not in ALLOWED):
                bad.append((src, dst))
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/import_graph.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", action="store_true", help="also list where each edge comes from")
    p.add_argument("--local", action="store_true", help="list the function-local imports")
    args = p.parse_args(argv)
    edges, where, local = graph()
    order = sorted(edges, key=lambda u: (RANK.get(u, 9), u))
    for src in order:
        print(f"{src:<12} -> {', '.join(sorted(edges[src], key=lambda u: (RANK.get(u, 9), u))) or '-'}")
        if args.modules:
            for dst in sorted(edges[src]):
                print(f"    {dst}: {', '.join(where[(src, dst)])}")
    found = cycles(edges)
    bad = violations(edges)
    module_cycles = cycles(module_graph())
    print(f"cycles: {found or 'none'}")
    print(f"module-level cycles: {module_cycles or 'none'}")
    print(f"layering violations: {[f'{a} -> {b}' for a, b in bad] or 'none'}")
    n_opt = sum(line.endswith("(optional)") for line in local)
    print(f"function-local imports: {len(local)} ({n_opt} of optional dependencies)")
    if args.local:
        print("\n".join(f"    {line}" for line in local))
    return 1 if found or bad or module_cycles else 0


if __name__ == "__main__":
    sys.exit(main())
