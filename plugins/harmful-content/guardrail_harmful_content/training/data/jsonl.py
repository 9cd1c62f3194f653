"""Reading hand-kept JSONL files: each object with its line, or an error naming the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["jsonl_objects"]


def jsonl_objects(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of ``path``; raises ``error`` naming the
    line when it is not a JSON object."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object")
        yield n, row
