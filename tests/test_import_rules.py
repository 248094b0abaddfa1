"""The house's import rules, read from the source (every import, module-level or inside a function):

- `core` (the library) imports nothing above it: not app, worker, trainer or the composition root;
- `app` (web) imports only `core`, and never the model code (`core.diffusion`, `core.basemodel`) or
  torch, so `densealign serve` starts without them;
- `worker` and `trainer` import `core` and themselves, never each other or the app;
- only the composition root (`densealign`), tests, benchmarks, experiments and scripts wire rooms
  together;
- no cycle between product modules.

`test_the_checker_catches_a_planted_back_edge` shows each rule fails when broken.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("core", "app", "worker", "trainer", "densealign")
# room -> rooms (or module prefixes) it may import; anything else first-party is a violation
ALLOWED = {
    "core": ("core",),
    "app": ("app", "core"),
    "worker": ("worker", "core"),
    "trainer": ("trainer", "core"),
    "densealign": PRODUCT,
}
MODEL_LIBRARIES = ("torch", "diffusers", "peft", "transformers")
# module prefixes a room must not import even though its rules allow the room they belong to
FORBIDDEN = {"app": ("core.diffusion", "core.basemodel", *MODEL_LIBRARIES)}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str) -> set[str]:
    """Every module `source` imports (absolute names; relative imports resolved against `module`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level]
                base = ".".join([*package, base]) if base else ".".join(package)
            found.add(base)
            # `from core.db import engine` may import the submodule core.db.engine
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path, rooms: Iterable[str] = PRODUCT) -> dict[str, set[str]]:
    """module -> the first-party modules it imports (names that are not modules are dropped)."""
    sources = {
        module_name(path, root): path.read_text()
        for room in rooms
        for path in sorted((root / room).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        names = imports_of(source, module)
        graph[module] = {n for n in names if n in sources or n.split(".")[0] in MODEL_LIBRARIES}
    return graph


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        room = module.split(".")[0]
        for target in sorted(targets):
            target_room = target.split(".")[0]
            if target_room in PRODUCT and target_room not in ALLOWED[room]:
                found.append(f"{module} imports {target}: {room} may import only {', '.join(ALLOWED[room])}")
            for prefix in FORBIDDEN.get(room, ()):
                if target == prefix or target.startswith(prefix + "."):
                    found.append(f"{module} imports {target}: {room} must not import {prefix}")
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def without_packages(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges into a package's `__init__` from inside it (`core.db.x` importing
    `core.db` re-exports is how a package is built, not a cycle between rooms)."""
    return {
        m: {t for t in targets if not (m.startswith(t + ".") and (ROOT / t.replace(".", "/")).is_dir())}
        for m, targets in graph.items()
    }


def test_the_product_keeps_its_import_rules() -> None:
    graph = import_graph(ROOT)
    assert {"core.pool", "core.queue", "app.main", "worker.main", "trainer.main", "densealign.cli"} <= set(
        graph
    )
    assert violations(graph) == []


def test_no_module_cycle() -> None:
    assert cycles(without_packages(import_graph(ROOT))) == []


@pytest.mark.parametrize(
    ("path", "line", "expected"),
    [
        ("core/pool.py", "from app.main import create_app", "core.pool imports app.main"),
        ("core/queue.py", "import densealign.cli", "core.queue imports densealign.cli"),
        ("app/deps.py", "from core.diffusion.policy import Policy", "must not import core.diffusion"),
        ("app/routes/pairs.py", "import torch", "must not import torch"),
        ("trainer/rounds.py", "from worker.sampling import PairSampler", "trainer may import only"),
        ("worker/sampling.py", "from trainer.rounds import Trainer", "worker may import only"),
    ],
)
def test_the_checker_catches_a_planted_back_edge(tmp_path: Path, path: str, line: str, expected: str) -> None:
    """A copy of the product with one planted import fails the rules, naming the edge."""
    for room in PRODUCT:
        for source in (ROOT / room).rglob("*.py"):
            target = tmp_path / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())
    planted = tmp_path / path
    planted.write_text(planted.read_text() + f"\n\ndef _planted() -> None:\n    {line}\n")
    found = violations(import_graph(tmp_path))
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_catches_a_planted_cycle(tmp_path: Path) -> None:
    for room in PRODUCT:
        for source in (ROOT / room).rglob("*.py"):
            target = tmp_path / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())
    queue = tmp_path / "core" / "queue.py"
    queue.write_text(
        queue.read_text() + "\n\ndef _planted() -> None:\n    from core.pool import refill_pool\n"
    )
    assert ["core.pool", "core.queue"] in cycles(without_packages(import_graph(tmp_path)))
