"""The package's shape: no import cycle anywhere in ``deepcore/``, and tooling (the benchmarks)
out of what ``import deepcore`` and ``deepcore train`` load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT, load_tool

graph_tool = load_tool("tools/import_graph.py")


def test_deepcore_has_no_import_cycle():
    assert graph_tool.cycles(graph_tool.import_graph(ROOT / "deepcore")) == []


def _package(tmp_path, files: dict[str, str]):
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "pkg"


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    """The cli <-> bench cycle was two imports inside functions: those count."""
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "cli.py": "def parser():\n    from .tools.bench import add\n",
        "tools/__init__.py": "",
        "tools/bench.py": "def add():\n    from ..cli import parser\n",
        "other.py": "from . import cli\nimport pkg.tools\n",
    })
    graph = graph_tool.import_graph(pkg)
    assert graph["pkg.other"] == {"pkg.cli", "pkg.tools"}
    assert graph_tool.cycles(graph) == [["pkg.cli", "pkg.tools.bench"]]
    assert graph_tool.main([str(pkg)]) == 1


def test_self_import_and_absolute_imports_are_cycles_too(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "from pkg import a\n",
                              "c.py": "from . import c\n"})
    assert graph_tool.cycles(graph_tool.import_graph(pkg)) == [["pkg.a", "pkg.b"], ["pkg.c"]]


def test_import_deepcore_and_the_train_command_never_load_the_benchmarks():
    code = ("import sys, deepcore, deepcore.cli, deepcore.train\n"
            "deepcore.cli._parser(with_bench=False)\n"
            "print(sorted(m for m in sys.modules if m.startswith('deepcore.bench')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_bench_is_still_a_subcommand(capsys):
    from deepcore.cli import main

    assert main(["bench", "--cases", "nothing"]) == 2
    assert "--cases: unknown ['nothing']" in capsys.readouterr().err


def _architecture() -> str:
    return (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")


def test_architecture_document_names_every_module_of_the_package():
    doc = _architecture()
    missing = []
    for path in sorted((ROOT / "deepcore").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" and path.parent != ROOT / "deepcore":
            named = f"`{rel.parent.as_posix()}/`" in doc or f"`deepcore/{rel.parent.name}/`" in doc
        else:
            # named by its path, or by its file name in the row of its folder
            named = f"`{rel.as_posix()}`" in doc or f"`{path.name}`" in doc or f"{path.name}`" in doc
        if not named:
            missing.append(rel.as_posix())
    assert missing == [], f"ARCHITECTURE.md does not mention {missing}"


def test_every_path_the_architecture_document_names_exists():
    import re

    doc = _architecture()
    paths = set(re.findall(r"`((?:deepcore|tests|benchmarks|tools|kernels|\.ci)/[\w./-]*)`", doc))
    assert len(paths) > 20
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
