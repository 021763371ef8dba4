"""The tools installed beside this Python (airflow, dvc...) that commands start."""

from __future__ import annotations

import sys
from pathlib import Path


def tool_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name
