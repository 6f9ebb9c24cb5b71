"""The handle on a ``reverse-etl ui`` child that the fixtures start (tests/ui/conftest.py)."""

from __future__ import annotations

import queue
import subprocess
from dataclasses import dataclass
from typing import Any


@dataclass
class Ui:
    url: str  # http://127.0.0.1:PORT (no trailing slash)
    proc: subprocess.Popen[str]
    lines: queue.Queue[str]

    def output(self) -> str:
        out = []
        while not self.lines.empty():
            out.append(self.lines.get_nowait())
        return "".join(out)


def _pump(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)
