"""The layering of docs/ARCHITECTURE.md, checked on the source: an import graph of src/medcl
(modules as nodes, every `import medcl...` including those inside functions; `if TYPE_CHECKING:`
blocks excluded) has no cycle and no edge from an earlier stage of the data flow to a later one,
and each shared concept has exactly one definition."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "medcl"

# stage of each package / top-level module, in the order data flows (docs/ARCHITECTURE.md)
STAGES = {
    "_version": 0, "environment": 0, "distributed": 0, "inputs": 0, "runfolder": 0, "precision": 0,
    # ingest writes the formats that data defines and reads (manifest, frame sets): it imports data
    "data": 1,
    "ingest": 2,
    "sampling": 3,
    "models": 4, "weights": 4,
    "losses": 5,
    "config": 6, "methods": 6,
    "train": 7,
    "evaluate": 8,
    "report": 9, "predict": 9,
    "cli": 10, "demo": 10, "__main__": 10, "__init__": 10,
}
MODULES = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
           for p in SRC.rglob("*.py")}
EARLY = ("data", "models", "losses", "sampling", "methods")
LATE = ("train", "evaluate", "report", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("medcl"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                if base.startswith("medcl"):
                    for a in child.names:  # `from pkg import submodule` depends on the submodule only
                        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {t for t in _imports(ast.parse(path.read_text()), package) if t in files}
        edges[name] = targets - {name}
    return edges


def test_every_module_has_a_stage(graph):
    assert {stage_key(m) for m in graph} <= set(STAGES)


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_no_import_against_the_data_flow(graph):
    backwards = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
                 if STAGES[stage_key(b)] > STAGES[stage_key(a)]]
    assert not backwards, "imports against the data flow: " + "; ".join(sorted(backwards))
    early_to_late = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
                     if stage_key(a) in EARLY and stage_key(b) in LATE]
    assert not early_to_late


@pytest.mark.parametrize("name", ["class WeightsError", "def load_checkpoint", "def save_checkpoint",
                                  "def parse(spec", "def to_model_input", "def unit_range", "def resize_frames",
                                  "CHECKPOINT_FORMAT =", "def build_backbone", "def train_with_selection",
                                  "def mean_std", "def write_run", "def select_label_fraction",
                                  "def kfold_by_patient"])
def test_one_definition(name):
    where = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if name in p.read_text()]
    assert len(where) == 1, f"{name!r} defined in {where}"
