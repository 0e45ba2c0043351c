"""The package's import graph follows a request's path downwards and has no cycles.

A room may import the rooms below it (skipping some is fine) and never one above it; rooms that
share a layer stay independent of each other (the scheduler never reaches into the executor, the
sampler never into attention). Every import statement counts, also those inside functions and
under `TYPE_CHECKING`, since each is a dependency a reader has to follow. Read with `ast`: nothing
is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pagedllm"

# Top to bottom. Each layer is a list of rooms (module-name prefixes); `True` marks a layer whose
# rooms may import each other (the base modules), otherwise they are independent.
LAYERS: list[tuple[list[str], bool]] = [
    (["pagedllm.__init__"], False),  # the public facade: `from pagedllm import LLM`
    (["pagedllm.entrypoints.cli"], False),
    (["pagedllm.benchmarks"], False),  # `pagedllm bench` runs them over the offline API
    (["pagedllm.entrypoints.llm", "pagedllm.entrypoints.openai", "pagedllm.entrypoints"], False),
    # scoring's pairs (LLM.score's and the server's /score); chat content parts with images (LLM.chat's and
    # the server's chat)
    (["pagedllm.entrypoints.score_utils", "pagedllm.entrypoints.chat_utils"], False),
    (["pagedllm.reasoning"], False),  # reasoning parsers: the server's, speaking its protocol
    (["pagedllm.entrypoints.openai.protocol"], False),
    (["pagedllm.engine"], False),
    (["pagedllm.core", "pagedllm.executor", "pagedllm.multimodal"], False),
    (["pagedllm.structured_output"], False),
    (["pagedllm.worker"], False),
    (["pagedllm.spec_decode"], False),  # speculative decoding: proposers, the rejection sampler, its counters
    (["pagedllm.lora"], False),  # LoRA: adapter loading, the slots, the LoRA linear method over model_executor's
    (["pagedllm.model_executor"], False),
    (["pagedllm.attention", "pagedllm.sample"], False),
    (["pagedllm.distributed", "pagedllm.cpu_ops"], False),
    (["pagedllm.config", "pagedllm.request", "pagedllm.scheduler_output", "pagedllm.sampling_params", "pagedllm.pooling_params",
      "pagedllm.outputs", "pagedllm.lora.request", "pagedllm.multimodal.inputs"], True),
    (["pagedllm.utils", "pagedllm.logger", "pagedllm.version"], True),
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports, resolved to the module (not the package) where possible."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target == "pagedllm":
                target = "pagedllm.__init__"
            if target:
                found.add(target)
    return found


def room_of(module: str) -> tuple[int, str]:
    """(layer index, room) of a module: the room with the longest matching prefix."""
    best: tuple[int, str] | None = None
    for index, (rooms, _) in enumerate(LAYERS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best[1])):
                best = (index, room)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(edges.items()):
        layer, room = room_of(module)
        for target in sorted(targets):
            target_layer, target_room = room_of(target)
            if target_room == room or target_layer > layer:
                continue
            if target_layer == layer and LAYERS[layer][1]:
                continue
            kind = "upwards" if target_layer < layer else "across independent rooms"
            problems.append(f"{module} imports {target} ({kind}: {room} -> {target_room})")
    return problems


def test_the_import_graph_has_no_cycles():
    assert find_cycles(graph()) == []


def test_no_room_imports_one_above_it_or_beside_it():
    assert layer_violations(graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The checker itself can fail: a made-up graph with both faults is reported."""
    edges = {
        "pagedllm.core.scheduler": {"pagedllm.engine.engine_core", "pagedllm.utils"},
        "pagedllm.engine.engine_core": {"pagedllm.core.scheduler"},
        "pagedllm.sample.sampler": {"pagedllm.attention.backend"},
        "pagedllm.utils": set(),
        "pagedllm.attention.backend": set(),
    }
    assert find_cycles(edges) == [["pagedllm.core.scheduler", "pagedllm.engine.engine_core"]]
    problems = layer_violations(edges)
    assert any("core.scheduler imports pagedllm.engine.engine_core (upwards" in p for p in problems)
    assert any("sample.sampler imports pagedllm.attention.backend (across independent rooms" in p for p in problems)
    assert not any(p.startswith("pagedllm.engine.engine_core") for p in problems)  # downwards is fine
