"""CONTRIBUTING.md, checked the way tests/test_docs.py checks the README: short, every
command of its bash blocks parses and names real files, real flags and registered
markers (the cheap side-effect-free one, ``make_docs.py --check``, runs as written), and
what it says about the suite (tiers, fixtures, the layering order) is what the code does."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _text() -> str:
    with open(os.path.join(ROOT, "CONTRIBUTING.md"), encoding="utf-8") as f:
        return f.read()


def _commands() -> list[str]:
    """The commands of its bash blocks, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", _text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _pyproject() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        return f.read()


def _help(*cmd: str) -> str:
    res = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_short_with_its_sections():
    text = _text()
    assert len(text.splitlines()) <= 90
    at = [text.index(f"\n## {t}\n") for t in ("Tests: two tiers", "Layering", "Lint",
                                             "Benchmarks and docs")]
    assert at == sorted(at)


def test_named_files_exist():
    """Every path it names in backticks (placeholders in capitals aside)."""
    paths = [w for w in re.findall(r"`([^`\s]+)`", _text())
             if ("/" in w or re.search(r"\.(py|md|toml)$", w)) and not re.search(r"[A-Z]{4}", w)]
    assert "benchmarks/results/" in paths and "tools/make_docs.py" in paths
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, missing


def test_commands_parse_and_name_real_files_flags_and_markers():
    cmds = _commands()
    assert len(cmds) >= 6
    pytest_help = None
    # pyproject.toml's [tool.pytest.ini_options] markers = ["name: what", ...]
    block = re.search(r"^markers = \[(.*?)^\]", _pyproject(), re.S | re.M).group(1)
    markers = set(re.findall(r'^\s*"(\w+):', block, re.M))
    for cmd in cmds:
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, (cmd, res.stderr)
        words = shlex.split(cmd)
        if words[:3] == ["python", "-m", "pytest"]:
            pytest_help = pytest_help or _help("-m", "pytest")
            args = words[3:]
            for i, w in enumerate(args):
                if w.startswith("-"):
                    assert re.search(rf"(^|[\s,]){re.escape(w)}[\s=,]", pytest_help), (cmd, w)
                elif i and args[i - 1] == "-m":
                    names = set(re.findall(r"\w+", w)) - {"not", "and", "or"}
                    assert names and names <= markers, (cmd, names, markers)
                elif i and args[i - 1] == "-n":
                    assert w == "auto" or w.isdigit(), cmd
                else:
                    assert os.path.exists(os.path.join(ROOT, w)), (cmd, w)
        elif words[0] == "python":
            script = words[1]
            assert script.startswith("tools/") and os.path.isfile(os.path.join(ROOT, script))
            own = words[2:words.index("--")] if "--" in words else words[2:]
            script_help = _help(script)
            for w in own:
                if w.startswith("--"):
                    assert w in script_help, (cmd, w)
            for w in (words[words.index("--") + 1:] if "--" in words else []):
                if not w.startswith("-") and not w.isdigit():
                    assert os.path.exists(os.path.join(ROOT, w)), (cmd, w)
        else:
            assert words[0] == "ruff", cmd  # the only other tool: in the test extra
            assert re.search(r'^test = \[[^]]*"ruff', _pyproject(), re.M)


def test_make_docs_check_runs_as_written():
    cmd = next(c for c in _commands() if c.endswith("make_docs.py --check"))
    res = subprocess.run(shlex.split(cmd.replace("python", sys.executable, 1)),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_tiers_are_the_readme_command_and_the_slow_marker():
    cmds = _commands()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    everything = next(c for c in cmds if c.startswith("python -m pytest tests "))
    assert f"&& {everything}\n" in readme
    fast = next(c for c in cmds if "-m" in shlex.split(c)[3:])
    assert shlex.split(fast)[3:5] == ["-m", "not slow"]
    assert conftest.SLOW_FIXTURES
    assert f"over {conftest.FAST_TIER_LIMIT_S:g} s" in _text()
    for name in ("SLOW_FIXTURES", "tiny_run", "trained_run", "shared_once"):
        assert f"`{name}`" in _text() and hasattr(conftest, name), name


def test_layering_order_is_the_tests():
    import test_layering

    section = _text().split("\n## Layering\n", 1)[1].split("\n## ", 1)[0]
    order = re.search(r"in this order: ([a-z, \n]+)\(", section).group(1)
    assert [w for w in re.split(r"[,\s]+", order) if w] == test_layering.ORDER
    assert set(test_layering.NARROWER) == {"runtime", "data", "method", "config"}
