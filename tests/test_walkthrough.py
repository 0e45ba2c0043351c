"""`docs/walkthrough.md` names real code: every cited path exists and every cited symbol is defined there.

The citation convention (stated at the top of the walkthrough): a path from the repository root
(`pagedllm/core/scheduler.py`, or a folder), optionally followed by `::` and a dotted name inside
that file (`pagedllm/core/scheduler.py::Scheduler.schedule`). A bare `Class.method` in backticks
must be defined in one of the files the page cites. Lines that begin with `*vLLM:` name vLLM's code,
not ours, and are skipped. Symbols are found with `ast` (no imports): module-level functions,
classes and assignments, then class members, including attributes set on `self`.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"

CITATION = re.compile(r"(?<![\w/.-])((?:pagedllm|tests|docs|benchmarks)/[\w./-]*[\w/])(?:::([A-Za-z_][\w.]*))?")
BARE_SYMBOL = re.compile(r"`([A-Z]\w*(?:\.\w+)+)(?:\(\))?`")
LINK = re.compile(r"\]\(([^)#\s:]+)\)")
STAGES = ["entrypoint", "engine", "scheduler", "block manager", "model runner", "model", "attention", "sampler"]


def checked_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.lstrip().startswith("*vLLM:")]


def _members(scope: ast.AST) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in getattr(scope, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def _self_attributes(cls: ast.ClassDef) -> set[str]:
    return {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"}


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_defined(path: Path, dotted: str) -> bool:
    scope: ast.AST = _tree(path)
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        members = _members(scope)
        if part in members:
            scope = members[part]
        elif isinstance(scope, ast.ClassDef) and i == len(parts) - 1 and part in _self_attributes(scope):
            return True
        else:
            return False
    return True


def check(text: str, root: Path = ROOT, base: Path = WALKTHROUGH.parent) -> tuple[list[str], int]:
    """(problems, number of citations checked) for a walkthrough's text."""
    problems: list[str] = []
    cited_files: set[Path] = set()
    count = 0
    lines = checked_lines(text)
    for line in lines:
        for path_text, symbol in CITATION.findall(line):
            count += 1
            path = root / path_text
            if not path.exists():
                problems.append(f"{path_text}: no such file or folder")
                continue
            if path.suffix == ".py":
                cited_files.add(path)
            if symbol:
                if path.suffix != ".py":
                    problems.append(f"{path_text}::{symbol}: symbols can only be cited in Python files")
                elif not is_defined(path, symbol):
                    problems.append(f"{path_text}::{symbol}: {symbol} is not defined in {path_text}")
        for target in LINK.findall(line):
            count += 1
            if not (base / target).exists():
                problems.append(f"link {target}: no such file next to the walkthrough")
    for line in lines:
        for symbol in BARE_SYMBOL.findall(line):
            count += 1
            if not any(is_defined(f, symbol) for f in cited_files):
                problems.append(f"`{symbol}`: defined in none of the cited files")
    return problems, count


def test_every_cited_path_exists_and_every_symbol_is_defined_there():
    problems, count = check(WALKTHROUGH.read_text(encoding="utf-8"))
    assert count >= 100  # the page cites code throughout; a broken pattern would find almost nothing
    assert problems == []


def test_the_check_fails_on_a_wrong_name():
    text = "\n".join([
        "`pagedllm/core/scheduler.py::Scheduler.schedule` is right, and so is `Scheduler.update_from_output`.",
        "`pagedllm/core/shceduler.py` is a misspelt path.",
        "`pagedllm/core/scheduler.py::Scheduler.schedul` is a misspelt method.",
        "`pagedllm/core/scheduler.py::KVCacheManager` is defined elsewhere.",
        "`Scheduler.no_such_method` is a bare name that resolves nowhere.",
        "![missing](images/no-such-image.png)",
        "*vLLM: `vllm/v1/core/sched/scheduler.py` (`Scheduler.anything_goes`) is vLLM's, not checked.*",
    ])
    problems, _ = check(text)
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    for wrong in ("shceduler.py", "Scheduler.schedul:", "KVCacheManager", "Scheduler.no_such_method",
                  "no-such-image.png"):
        assert wrong in joined
    assert "anything_goes" not in joined


def test_attributes_set_on_self_count_as_defined():
    path = ROOT / "pagedllm/core/kv_cache_manager.py"
    assert is_defined(path, "KVCacheManager.req_to_blocks")
    assert not is_defined(path, "KVCacheManager.req_to_blocks.more")
    assert not is_defined(path, "req_to_blocks")


def test_walkthrough_follows_vllms_reading_order_from_both_doors():
    text = WALKTHROUGH.read_text(encoding="utf-8")
    headings = [line[3:].lower() for line in text.splitlines() if line.startswith("## ")]
    numbered = [h for h in headings if re.match(r"\d+\. ", h)]
    positions = []
    for stage in STAGES:
        matches = [i for i, h in enumerate(numbered) if stage in h and i not in positions]
        assert matches, f"no numbered section for the {stage} stage: {numbered}"
        positions.append(matches[0])
    assert positions == sorted(positions), numbered
    assert "pagedllm/entrypoints/llm.py::LLM.generate" in text
    assert "POST /v1/chat/completions" in text
    assert "pagedllm/attention/torch_paged_attention.py::TorchPagedAttention.forward" in text
