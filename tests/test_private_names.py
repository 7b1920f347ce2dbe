"""No module of the package uses another module's private (``_x``) names: not by
``from m import _x``, not as ``m._x`` on an imported module. Exceptions: ``os._exit``
(public, documented: exit without cleanup) and JAX's own ``jax._src``, reached in one
guarded place (``ssm_jax.core.parallel``) because JAX has no public handle on what it
gives there."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ssm_jax"
ALLOWED_MODULES = {("core/parallel.py", "jax._src")}
ALLOWED_ATTRIBUTES = {"os._exit"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: str, rel: str) -> list[str]:
    """``"line: what"`` for each use of another module's private name in ``source`` (the
    module at ``rel``, relative to the package), in line order."""
    tree = ast.parse(source, rel)
    imported: set[str] = set()  # names bound by imports: modules and their attributes
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                imported.add(a.asname or a.name.split(".")[0])
                if any(_private(p) for p in a.name.split(".")) and \
                        not any((rel, m) in ALLOWED_MODULES for m in _prefixes(a.name)):
                    found.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            for a in node.names:
                imported.add(a.asname or a.name)
            private_mod = any(_private(p) for p in mod.split(".")) and \
                not any((rel, m) in ALLOWED_MODULES for m in _prefixes(mod))
            if private_mod or any(_private(a.name) for a in node.names):
                found.append((node.lineno, f"from {mod} import "
                                           f"{', '.join(a.name for a in node.names)}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and \
                isinstance(node.value, ast.Name) and node.value.id in imported and \
                f"{node.value.id}.{node.attr}" not in ALLOWED_ATTRIBUTES:
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def test_no_module_uses_another_modules_private_names():
    bad = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).as_posix()
        if uses := private_uses(p.read_text(), rel):
            bad[rel] = uses
    assert not bad, bad


def test_the_check_finds_private_uses():
    """The check itself: each kind of use is found, the allowed ones are not."""
    source = ("import os\nfrom ssm_jax.runs import rundir\nfrom m import _x\n"
              "import jax._src.xla_bridge\nrundir._hidden()\nos._exit(1)\n"
              "from jax._src import distributed\nself._own = 1\n")
    assert private_uses(source, "x/y.py") == [
        "3: from m import _x", "4: import jax._src.xla_bridge", "5: rundir._hidden",
        "7: from jax._src import distributed"]
    assert private_uses(source, "core/parallel.py") == [
        "3: from m import _x", "5: rundir._hidden"]
