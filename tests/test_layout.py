"""The package's layout rules, read off the source with `ast`:

1. the top level (the documents' diagram) imports only the top level and `memory/`; the one
   facade, `stable_diffusion.py`, also `addons/` (its `load_lora` and the like);
2. `checkpoints/` and `addons/` never import the pipelines (nor the CLI, nor the notebook helpers);
3. nothing outside `lab/` imports `lab/`; `training/` is imported by nothing in the package;
4. no import inside a function (a dodged cycle) and no cycle at all.
Imports under `if TYPE_CHECKING:` are annotations only and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sd_scratch"
ENTRY_POINTS = {"sd_scratch", "sd_scratch.__main__", "sd_scratch.cli"}  # may import any of the layers below
FOLDERS = ("checkpoints", "memory", "lab", "training", "addons")
FACADE = "sd_scratch.stable_diffusion"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path) -> tuple[set[str], list[str]]:
    """(sd_scratch modules imported at module level, descriptions of imports inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    nested: list[str] = []

    def target(node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            root = ".".join(base + ([node.module] if node.module else []))
        else:
            root = node.module or ""
        # `from . import pipelines` names a module; `from .vae import LATENT_SCALE` names its module
        return [f"{root}.{alias.name}" if (PACKAGE.parent / f"{root}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                or (PACKAGE.parent / f"{root}.{alias.name}".replace(".", "/")).is_dir() else root
                for alias in node.names]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = target(child) if isinstance(child, ast.ImportFrom) else [a.name for a in child.names]
                ours = [n for n in names if n == "sd_scratch" or n.startswith("sd_scratch.")]
                if in_function and ours:
                    nested.append(f"line {child.lineno}: {', '.join(ours)}")
                found.update(ours)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    found.discard(name)
    return found, nested


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imports_of(path)[0] for name, path in MODULES.items()}


def layer(name: str) -> str:
    parts = name.split(".")
    if name in ENTRY_POINTS:
        return "entry"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FOLDERS) else "top"


def test_the_top_level_is_the_diagram_and_the_folders_are_known():
    tops = sorted(n for n in MODULES if layer(n) == "top")
    assert {"sd_scratch.tokenizer", "sd_scratch.text_encoder", "sd_scratch.unet", "sd_scratch.vae",
            "sd_scratch.noise_schedule", "sd_scratch.samplers", "sd_scratch.pipelines"} <= set(tops)
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FOLDERS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_inside_a_function(name):
    assert imports_of(MODULES[name])[1] == [], f"{name} imports inside a function"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) == "top"))
def test_the_top_level_imports_only_the_top_level_and_memory(name):
    allowed = ("top", "memory", "addons") if name == FACADE else ("top", "memory")
    bad = sorted(m for m in GRAPH[name] if layer(m) not in allowed and m not in ("sd_scratch.memory", "sd_scratch.addons"))
    assert bad == [], f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) in ("checkpoints", "addons")))
def test_checkpoints_and_addons_never_import_the_pipelines(name):
    bad = sorted(m for m in GRAPH[name] if m in ("sd_scratch.pipelines", "sd_scratch.cli")
                 or layer(m) in ("lab", "training"))
    assert bad == [], f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_lab_imports_lab_and_nothing_imports_training(name):
    if layer(name) != "lab":
        assert not [m for m in GRAPH[name] if layer(m) == "lab"], f"{name} imports lab/"
    if layer(name) != "training":
        assert not [m for m in GRAPH[name] if layer(m) == "training"], f"{name} imports training/"


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for m in sorted(GRAPH.get(name, ())):
            if m not in GRAPH:
                continue
            assert state.get(m) != "open", "cycle: " + " -> ".join(path + [name, m])
            if m not in state:
                visit(m, path + [name])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def test_the_rules_see_imports():
    """The checker itself: it finds the imports that are there (so the rules above are not vacuous)."""
    assert "sd_scratch.samplers" in GRAPH["sd_scratch.pipelines"]
    assert "sd_scratch.memory.vae_tiling" in GRAPH["sd_scratch.images"]
    assert "sd_scratch.stable_diffusion" in GRAPH["sd_scratch.checkpoints.load"]
    assert "sd_scratch.pipelines" in GRAPH["sd_scratch.lab.visualize"]
