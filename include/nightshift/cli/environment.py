"""The environment every command runs in: Airflow's and nightshift's variables, and the tools beside Python."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nightshift.settings import (
    Settings,
    ensure_airflow_config,
    runtime_env,
)


def configure_environment(settings: Settings) -> dict[str, str]:
    """Export the runtime environment (explicit variables win) before anything imports Airflow."""
    ensure_airflow_config(settings)
    for key, value in runtime_env(settings).items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in runtime_env(settings)}


def tool_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name
