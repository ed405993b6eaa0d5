"""Real data that installs from the package registry: codespell's dictionary of misspellings.

`codespell_lib/data/dictionary.txt` holds about 65,000 `misspelling->correction` lines; about 59,000
have a single correction, and those are the spelling-correction pairs. The split is fixed by a hash of
the misspelling (CRC-32 mod 100: 0-89 train, 90-94 validation, 95-99 test), so it does not depend on
the order of the file and a word never moves between splits when the dictionary grows.
"""
from __future__ import annotations

import ast
import functools
import os
import random
import re
import textwrap
import zlib

SPLITS = {"train": range(0, 90), "validation": range(90, 95), "test": range(95, 100)}


def codespell_dictionary() -> str:
    try:
        import codespell_lib
    except ImportError as err:
        raise FileNotFoundError("codespell is not installed: pip install -e '.[examples]'") from err
    return os.path.join(os.path.dirname(codespell_lib.__file__), "data", "dictionary.txt")


def codespell_pairs(split: str = "train", limit: int | None = None, seed: int = 0, path: str | None = None):
    """(misspelling, correction) pairs of one split; `limit` takes a seeded random subset of that size."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    path = path or codespell_dictionary()
    buckets = SPLITS[split]
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "->" not in line:
                raise ValueError(f"{path}:{line_no}: expected 'misspelling->correction', got {line!r}")
            wrong, right = line.split("->", 1)
            corrections = [c.strip() for c in right.split(",") if c.strip()]
            if len(corrections) != 1:
                continue  # ambiguous: several corrections
            if zlib.crc32(wrong.encode("utf-8")) % 100 in buckets:
                pairs.append((wrong, corrections[0]))
    pairs.sort()
    if limit is not None and limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs


# --------------------------------------------------------------------------------------------------
# code summaries: the running interpreter's standard library, function code -> its docstring's first sentence

SKIPPED_PACKAGES = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                    "turtledemo", "__phello__"}


def code_summary_pairs(split: str = "train", limit: int | None = None, seed: int = 0, private: bool = False,
                       site_packages: bool = False, root: str | None = None):
    """(code, summary) pairs of one split from the standard library of the running interpreter (the
    CodeSearchNet / CodeXGLUE code-to-text task, offline): the source of every public function and method that
    has a docstring, with the docstring removed, and the docstring's first sentence (>= 3 words, its final
    period dropped). Skipped: test packages, names starting with "_" (`private=True` keeps helpers, not dunder
    methods), bodies that are only the docstring, and code seen twice (the first qualified name keeps it). The
    split is a hash of the qualified name (`module.Class.method`), as codespell's is of the word; the pairs
    differ slightly between Python versions. `site_packages=True` adds the installed packages' code."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    buckets = SPLITS[split]
    pairs = [(code, summary) for name, code, summary in code_summaries(root, private, site_packages)
             if zlib.crc32(name.encode("utf-8")) % 100 in buckets]
    if limit is not None and limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs


def code_summaries(root: str | None = None, private: bool = False, site_packages: bool = False):
    """Every (qualified name, code, summary) of `code_summary_pairs`, sorted by name (read once per process)."""
    import sysconfig

    roots = [root or sysconfig.get_paths()["stdlib"]]
    if site_packages:
        roots.append(sysconfig.get_paths()["purelib"])
    return _summaries(tuple(roots), private)


@functools.lru_cache(maxsize=4)
def _summaries(roots: tuple[str, ...], private: bool):
    found, seen = [], set()
    for top in roots:
        inside_site = top.rstrip(os.sep).endswith(("site-packages", "dist-packages"))
        for folder, subfolders, files in os.walk(top):
            skip = SKIPPED_PACKAGES - ({"site-packages", "dist-packages"} if inside_site else set())
            subfolders[:] = sorted(d for d in subfolders if d not in skip and not d.startswith("."))
            for file in sorted(files):
                if file.endswith(".py") and not file.startswith("test_"):
                    path = os.path.join(folder, file)
                    module = os.path.relpath(path, top)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    found += _functions(path, module, private)
    found.sort()
    kept = []
    for name, code, summary in found:
        if code not in seen:
            seen.add(code)
            kept.append((name, code, summary))
    return kept


def _functions(path: str, module: str, private: bool):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError, MemoryError):
        return []  # a module this interpreter cannot parse (a template; nesting deeper than the parser's limit)
    lines, out = text.splitlines(), []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef) and _public(node.name, private):
                visit(node.body, f"{prefix}.{node.name}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name, private):
                pair = _pair(node, lines)
                if pair:
                    out.append((f"{prefix}.{node.name}", *pair))

    try:
        visit(tree.body, module)
    except RecursionError:  # nesting too deep to walk: the file is skipped like one that does not parse
        return []
    return out


def _public(name: str, private: bool) -> bool:
    return not name.startswith("_") or (private and not name.endswith("__"))


def _pair(node, lines):
    doc = ast.get_docstring(node)
    first = node.body[0]
    if not doc or len(node.body) < 2 or not isinstance(first, ast.Expr):
        return None
    summary = " ".join(doc.strip().split("\n\n")[0].split())
    summary = re.split(r"(?<=[.!?])\s", summary, maxsplit=1)[0].rstrip(".")
    if len(summary.split()) < 3 or summary.startswith(">>>"):
        return None
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    kept = lines[start - 1:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
    code = textwrap.dedent("\n".join(line for line in kept if line.strip() or line == "")).strip("\n")
    return (code, summary) if code else None


def name_baseline(code: str) -> str:
    """The baseline summary of a function's code: its name split into words (`get_user_name`, `getUserName` ->
    "get user name")."""
    found = re.search(r"def\s+(\w+)", code)
    name = found.group(1) if found else ""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).replace("_", " ").split()
    return " ".join(w.lower() for w in words) or name
