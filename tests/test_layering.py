"""The package's parts import only downward: each subpackage of ``ssm_jax`` imports from
itself and from the parts before it in ``ORDER`` (as each subpackage's docstring states),
never from a part above it or from a top-level module of ``ssm_jax``."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ssm_jax")
ORDER = ["core", "runtime", "data", "method", "config", "runs", "training", "scoring",
         "serving", "report", "commands"]
# Parts that may not import every part before them.
NARROWER = {"runtime": {"core"}, "data": {"core"}, "method": {"core", "data"},
            "config": {"core", "data", "method"}}


def imported_parts(source: str) -> list[tuple[int, str | None]]:
    """(line, part) for every import of ``ssm_jax[.part...]`` in ``source`` (lazy ones too);
    part None for ``ssm_jax`` itself or a top-level module of it."""
    out = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "ssm_jax":
                out.append((node.lineno, parts[1] if len(parts) > 1 and parts[1] in ORDER
                            else None))
    return out


def violations(part: str, source: str) -> list[str]:
    """What an ``ssm_jax/<part>/`` module's source imports against the layering."""
    allowed = NARROWER.get(part, set(ORDER[:ORDER.index(part)]))
    return [f"line {line}: imports {'ssm_jax top level' if tgt is None else tgt}"
            for line, tgt in imported_parts(source)
            if tgt != part and (tgt is None or tgt not in allowed)]


def test_every_subpackage_is_a_known_part():
    found = {d for d in os.listdir(ROOT)
             if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
    assert found == set(ORDER)


def test_no_import_goes_up():
    bad = []
    for part in ORDER:
        for name in sorted(os.listdir(os.path.join(ROOT, part))):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, part, name)) as f:
                    bad += [f"{part}/{name} {v}" for v in violations(part, f.read())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("part,source,expected", [
    ("method", "from ssm_jax.core import errors\n", 0),
    ("method", "from ssm_jax.training import step\n", 1),  # up
    ("core", "def f():\n    from ssm_jax import config_utils\n", 1),  # lazy, top level
    ("serving", "import ssm_jax.scoring.batch\n", 0),
    ("config", "from ssm_jax.runs import rundir\n", 1),
])
def test_the_check_sees_upward_imports(part, source, expected):
    assert len(violations(part, source)) == expected
