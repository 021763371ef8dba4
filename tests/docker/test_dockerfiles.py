"""The images cannot be built here (no Docker engine), so lint them and check what they promise."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILES = sorted((REPO / "docker").glob("*/Dockerfile"))
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_every_image_has_a_dockerfile():
    assert {p.parent.name for p in DOCKERFILES} >= {"airflow", "trainer", "serving"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_is_clean(dockerfile):
    proc = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_airflow_image_is_the_pinned_release():
    pinned = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    text = (REPO / "docker" / "airflow" / "Dockerfile").read_text()
    assert f"FROM apache/airflow:{pinned}-python3.11" in text


def test_trainer_image_pins_match_the_project():
    project = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "requirements.txt").read_text(), re.M))
    trainer = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$",
                              (REPO / "docker" / "trainer" / "requirements.txt").read_text(), re.M))
    assert trainer and all(project[name] == version for name, version in trainer.items())
    text = (REPO / "docker" / "trainer" / "Dockerfile").read_text()
    assert f"torch=={project['torch']}" in text and "nvidia/cuda" in text


def test_airflow_image_applies_the_settings_file_at_start():
    text = (REPO / "docker" / "airflow" / "Dockerfile").read_text()
    entrypoint = REPO / "docker" / "airflow" / "entrypoint.sh"
    assert 'ENTRYPOINT ["/usr/bin/dumb-init", "--", "/opt/nightshift/entrypoint.sh"]' in text
    assert "NIGHTSHIFT_SETTINGS_FILE=/opt/nightshift/airflow_settings.yaml" in text
    assert entrypoint.stat().st_mode & 0o111
    script = entrypoint.read_text()
    assert "nightshift apply-settings --wait" in script and 'exec /entrypoint "$@"' in script
    proc = subprocess.run(["bash", "-n", str(entrypoint)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_serving_image_needs_keys_and_checks_liveness():
    text = (REPO / "docker" / "serving" / "Dockerfile").read_text()
    assert "/livez" in text and "NIGHTSHIFT_API_KEYS" in text
