"""Content digests for self-describing caches: file bytes, fonts, code syntax trees, JSON keys.

A cache key built from these changes whenever anything its content depends on changes (a file's
bytes, a function's code, a parameter), and never for formatting, comments or docstrings.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import textwrap
from typing import List, Sequence, Tuple

__all__ = ["file_sha256", "font_hashes", "fonts_digest", "code_digest", "canonical_json",
           "digest_key", "key_differences"]


@functools.lru_cache(maxsize=256)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and modification time)."""
    del size, mtime_ns  # memo key only
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def font_hashes(paths: Sequence[str]) -> List[List[str]]:
    """``[[file name, SHA-256 of its bytes], ...]`` of the font files."""
    out = []
    for p in paths:
        st = os.stat(p)
        digest = file_sha256(os.path.abspath(p), st.st_size, st.st_mtime_ns)
        out.append([os.path.basename(p), digest])
    return out


def fonts_digest(paths: Tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(font_hashes(paths)).encode()).hexdigest()


def code_digest(functions) -> str:
    """SHA-256 of the syntax trees of ``functions`` without docstrings (so comments, docstrings
    and formatting do not count, any change of the code does). ``"unavailable"`` without source."""
    h = hashlib.sha256()
    for fn in functions:
        fn = inspect.unwrap(fn)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError):
            return "unavailable"
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(fn.__qualname__.encode())
        h.update(ast.dump(tree, include_attributes=False).encode())
    return h.hexdigest()


def canonical_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def digest_key(key: dict) -> str:
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


def key_differences(a: dict, b: dict, prefix: str = "") -> List[str]:
    """Dotted names of the leaves that differ between two JSON dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += key_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
