"""The kubelet's layers, as docs/kubelet.md's "Layers" table states them, checked on the code.

The table is read from the document itself, so the document and this test say the same
thing. Each module's imports (read with `ast`, never imported) must be the standard library
or a name the most specific row for the module allows. Two rules cut across: only the API
server adapter imports `kubernetes`, and only the Slurm adapter starts Slurm's commands.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "kubelet.md"
SLURM_COMMANDS = frozenset(
    {"sbatch", "squeue", "sacct", "scancel", "sinfo", "sstat", "scontrol", "srun"}
)
SLURM_ADAPTER = "kubelet_py/adapters/slurm.py"
API_ADAPTER = "kubelet_py.adapters.apiserver"
# Where Slurm's commands may be named besides the adapter: root's own test bed. (The job
# script's `srun` is in its template, which the kubelet renders and never runs.)
SLURM_EXEMPT = ("hpk/testbed/",)


@dataclass(frozen=True)
class Row:
    where: str
    """A module (`kubelet_py.provider`) or a package (`kubelet_py.job`)."""
    allowed: tuple[str, ...]
    """Importable names; `stdlib` for the standard library."""
    package: bool
    """Whether the row covers a package's modules, or just the one module."""


def layer_table(text: str) -> list[Row]:
    """The rows of the "Layers" section's table."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`kubelet_py/"):
            continue
        path = cells[0].strip("`")
        where = path.removesuffix("/").removesuffix(".py").replace("/", ".")
        names = re.findall(r"`([\w.]+)`", cells[2])
        if re.search(r"(^|[ ,])stdlib\b", cells[2]):
            names.append("stdlib")
        package = path.endswith("/")
        rows.append(
            Row(where=where.removesuffix(".__init__"), allowed=tuple(names), package=package)
        )
    return rows


def imports(source: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of each absolute import: `import a.b` gives `a.b`, and
    `from a import b` gives `a.b`, whether b is a module or a name of a."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def row_for(module: str, rows: list[Row]) -> Row | None:
    matching = [
        row
        for row in rows
        if module == row.where or (row.package and module.startswith(row.where + "."))
    ]
    return max(matching, key=lambda row: len(row.where), default=None)


def allowed(name: str, row: Row) -> bool:
    top = name.split(".", maxsplit=1)[0]
    if top == "__future__" or ("stdlib" in row.allowed and top in sys.stdlib_module_names):
        return True
    # A package's modules import one another; `from kubelet_py.job import podfiles` also
    # gives the package itself.
    return any(name == ok or name.startswith(ok + ".") for ok in (*row.allowed, row.where))


def violations(module: str, source: str, rows: list[Row]) -> list[str]:
    row = row_for(module, rows)
    if row is None:
        return [f"{module}: no row of docs/kubelet.md's layer table covers it"]
    found = []
    for line, name in imports(source):
        if _is_package_constant(name):
            continue
        if not allowed(name, row):
            found.append(f"{module}:{line} imports {name}, which {row.where}'s row does not allow")
        if name.split(".")[0] == "kubernetes" and module != API_ADAPTER:
            found.append(f"{module}:{line} imports kubernetes; only {API_ADAPTER} may")
    return found


def _is_package_constant(name: str) -> bool:
    """`kubelet_py.CONNECTED_MESSAGE`: one of the lines kubelet_py/__init__.py defines, which
    every layer may log."""
    package, _, constant = name.partition(".")
    return package == "kubelet_py" and constant.isupper()


def slurm_calls(source: str) -> list[int]:
    """Lines of list or tuple literals whose first word is one of Slurm's commands."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.List | ast.Tuple)
        and node.elts
        and isinstance(node.elts[0], ast.Constant)
        and node.elts[0].value in SLURM_COMMANDS
    ]


def kubelet_modules() -> list[Path]:
    return sorted((ROOT / "kubelet_py").rglob("*.py"))


def test_the_table_covers_every_package_and_names_real_ones() -> None:
    rows = layer_table(DOC.read_text())
    assert {row.where for row in rows} >= {
        "kubelet_py.job", "kubelet_py.pod", "kubelet_py.adapters", "kubelet_py.loops",
        "kubelet_py.provider", "kubelet_py.errors", "kubelet_py.main",
    }  # fmt: skip
    for row in rows:
        path = ROOT / row.where.replace(".", "/")
        assert path.is_dir() or path.with_suffix(".py").is_file() or row.where == "kubelet_py"


def test_every_kubelet_module_imports_only_what_its_layer_allows() -> None:
    rows = layer_table(DOC.read_text())
    found = [
        problem
        for path in kubelet_modules()
        for problem in violations(module_name(path), path.read_text(), rows)
    ]
    assert found == []


def test_only_the_api_adapter_imports_kubernetes_anywhere_in_hpk() -> None:
    found = [
        f"{module_name(path)}:{line}"
        for path in sorted((ROOT / "hpk").rglob("*.py"))
        for line, name in imports(path.read_text())
        if name.split(".")[0] == "kubernetes"
    ]
    assert found == []


def test_only_the_slurm_adapter_runs_slurms_commands() -> None:
    found = []
    for path in [*kubelet_modules(), *sorted((ROOT / "hpk").rglob("*.py"))]:
        relative = str(path.relative_to(ROOT))
        if relative == SLURM_ADAPTER or relative.startswith(SLURM_EXEMPT):
            continue
        found += [f"{relative}:{line}" for line in slurm_calls(path.read_text())]
    assert found == []


def test_a_bad_import_is_caught() -> None:
    rows = layer_table(DOC.read_text())
    # The job's code must stay stdlib only, the pure layer may not reach the API server, and
    # nobody but the adapter imports kubernetes.
    assert violations("kubelet_py.job.launch", "import yaml\n", rows)
    assert violations("kubelet_py.pod.render", "from kubelet_py.adapters import slurm\n", rows)
    assert violations("kubelet_py.loops.nodes", "from kubernetes import client\n", rows)
    assert violations("kubelet_py.job.launch", "import json\nimport os\n", rows) == []
    assert slurm_calls('subprocess.run(["scancel", job])\n') == [1]
    assert slurm_calls('log(source="squeue")\n') == []


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules of `sources` it imports (at any depth of its code, so that an
    import put inside a function to dodge a circle still counts)."""
    known = set(sources)
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        targets = set()
        for _, name in imports(source):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                target = ".".join(parts[:end])
                if target in known:
                    if target != module:
                        targets.add(target)
                    break
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: its strongly connected parts of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                part.append(member)
                if member == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_hpk_or_the_kubelet_is_in_an_import_circle() -> None:
    paths = [*kubelet_modules(), *sorted((ROOT / "hpk").rglob("*.py"))]
    graph = import_graph({module_name(path): path.read_text() for path in paths})
    assert circles(graph) == []


def test_an_import_circle_is_caught() -> None:
    sources = {
        "hpk.images": "def pull():\n    from hpk.controlplane.image import find\n",
        "hpk.controlplane.image": "from hpk.images import check\n",
        "hpk.toolchain": "import os\n",
    }
    assert circles(import_graph(sources)) == [["hpk.controlplane.image", "hpk.images"]]
    del sources["hpk.controlplane.image"]
    assert circles(import_graph(sources)) == []
