"""The code stays readable: no function in a top-level file longer than a screen, train.py the training loop."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_TRAIN_LINES = 650


def test_no_function_is_longer_than_a_screen() -> None:
    too_long = []
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines; split them by what each part does: {too_long}"


def test_train_py_holds_the_training_loop_only() -> None:
    lines = len((ROOT / "train.py").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_TRAIN_LINES, (
        f"train.py has {lines} lines (limit {MAX_TRAIN_LINES}): move what is not the training loop to the module it belongs to"
    )
