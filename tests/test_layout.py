"""The package's shape: imports only go down the layers, module-level imports form no cycle, no
private attribute of diffusers/transformers objects is touched, and listing commands loads no torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import localora
from support import heavy_imports

ROOT = Path(localora.__file__).parent
# Lowest first. A module may import from its own layer's package and from lower layers only.
LAYERS = [
    {"errors", "paths", "files", "events", "verbosity", "__init__", "archs", "attention"},
    {"profiles", "devices", "tiny", "estimates", "hub", "cluster", "kohya", "memory", "planning"},
    {"diffusion"}, {"export"}, {"vlm"}, {"scoring"}, {"search"}, {"runs"}, {"bench"}, {"ui"}, {"cli"}, {"__main__"},
]


def layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield path, rel.parts, ast.parse(path.read_text(encoding="utf-8"))


def imported(tree, top_level_only: bool = False):
    """(line, 'localora.x.y') for every import of localora code in the tree."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("localora"):
            if node.module == "localora":
                for alias in node.names:
                    yield node.lineno, f"localora.{alias.name}"
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("localora."):
                    yield node.lineno, alias.name


def test_imports_only_go_down_the_layers():
    upward = []
    for path, parts, tree in modules():
        here = layer(parts[0])
        for line, target in imported(tree):
            pieces = target.split(".")
            if len(pieces) < 2 or pieces[1] == "__version__" or pieces[1] == "package_version":
                continue
            if pieces[1] != parts[0] and layer(pieces[1]) > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert upward == []


def test_module_level_imports_form_no_cycle():
    graph = {}
    for _, parts, tree in modules():
        name = ".".join(("localora", *parts)).removesuffix(".__init__")
        graph[name] = {t for _, t in imported(tree, top_level_only=True)}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [node]))
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for nxt in graph[node]:
            visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        visit(node, [])


def test_no_private_attributes_of_library_objects():
    private = re.compile(r"\b(pipe|pipeline|unet|vae|text_encoder\w*|scheduler|processor|tokenizer|model)\._[a-z]")
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path, _, _ in modules() for i, line in enumerate(path.read_text().splitlines(), 1)
            if private.search(line)]
    assert hits == []


def test_the_cli_loads_no_torch_until_a_command_needs_a_model():
    # Commands on files (loras inspect, open, export) are checked in test_cli_surface.py.
    for args in (["--help"], ["models"], ["loras", "list"], ["compose", "--help"]):
        code, heavy, _ = heavy_imports(*args)
        assert (code, heavy) == (0, []), args
