"""Real English text that ships with every Python: the standard library's module docs.

Used wherever a context must look like a document (codec reports, profiler checks,
bench workloads) without downloading anything. Deterministic for a given Python.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

#: Modules with long, prose-heavy documentation.
MODULES = (
    "argparse", "asyncio.events", "collections", "concurrent.futures", "contextlib", "dataclasses",
    "decimal", "email.message", "functools", "http.client", "inspect", "json", "logging",
    "multiprocessing.pool", "pathlib", "pickle", "re", "shutil", "socket", "subprocess",
    "tarfile", "threading", "typing", "unittest.case", "urllib.request", "zipfile",
)


def documents() -> list[tuple[str, str]]:
    """(module name, text) for each module: its docstring and its public members' docstrings."""
    docs = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            with warnings.catch_warnings():  # deprecated aliases (typing.re) warn on access
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 200 and doc not in parts:
                parts.append(f"{attr}: {doc}")
        text = "\n\n".join(p for p in parts if p)
        if text:
            docs.append((name, text))
    return docs


def sample_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of documentation prose."""
    out, size = [], 0
    while size < min_chars:
        for _, text in documents():
            out.append(text)
            size += len(text)
            if size >= min_chars:
                break
    return "\n\n".join(out)
