"""The package's shape: who imports whom, import cycles, long functions and modules (JSON).

    python experiments/module_graph.py                 # JSON summary
    python experiments/module_graph.py --edges         # plus every import edge

Reads ``dfml_jax/`` with :mod:`ast` (nothing is imported). Reports, for issue 17's targets:
the module-level import graph among ``dfml_jax`` modules and its cycles (strongly connected
components), function-level imports of the package's own modules (they hide cycles), functions
over ``--max-function`` lines and modules over ``--max-module`` lines.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
from typing import Dict, List, Set

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dfml_jax")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def modules() -> Dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                out[module_name(os.path.join(d, f))] = os.path.join(d, f)
    return dict(sorted(out.items()))


def resolve(name: str, known: Set[str]) -> str | None:
    """The longest known module that ``name`` (``a.b.c`` or ``a.b.c.symbol``) lies in."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def imports(mod: str, tree: ast.AST, known: Set[str], is_pkg: bool):
    """``(module_level, function_level)`` sets of package modules imported by ``mod``."""
    top, inner = set(), set()

    def visit(node, depth):
        for child in ast.iter_child_nodes(node):
            d = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in child.names] + [base]
            for n in names:
                r = resolve(n, known)
                if r and r != mod:
                    (inner if d else top).add(r)
            visit(child, d)

    visit(tree, 0)
    return top, inner - top


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in graph:
        if v not in index:
            strong(v)
    return out


def long_functions(tree: ast.AST, limit: int) -> List[tuple]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append((node.name, node.lineno, n))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-function", type=int, default=80)
    p.add_argument("--max-module", type=int, default=600)
    p.add_argument("--edges", action="store_true")
    args = p.parse_args(argv)
    mods = modules()
    known = set(mods)
    graph, inner, long_fns, long_mods = {}, {}, [], []
    for mod, path in mods.items():
        src = open(path, encoding="utf-8").read()
        tree = ast.parse(src)
        top, fn_level = imports(mod, tree, known, path.endswith("__init__.py"))
        graph[mod], inner[mod] = top, fn_level
        long_fns += [{"module": mod, "function": f, "line": ln, "lines": n}
                     for f, ln, n in long_functions(tree, args.max_function)]
        lines = src.count("\n")
        if lines > args.max_module:
            long_mods.append({"module": mod, "lines": lines})
    report = {
        "modules": len(mods),
        "module_level_edges": sum(len(v) for v in graph.values()),
        "cycles": cycles(graph),
        "cycles_with_function_level_imports": cycles(
            {m: graph[m] | inner[m] for m in graph}),
        "function_level_package_imports": sum(len(v) for v in inner.values()),
        "functions_over_limit": sorted(long_fns, key=lambda r: -r["lines"]),
        "modules_over_limit": sorted(long_mods, key=lambda r: -r["lines"]),
    }
    if args.edges:
        report["edges"] = {m: sorted(v) for m, v in graph.items()}
        report["function_level_edges"] = {m: sorted(v) for m, v in inner.items() if v}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
