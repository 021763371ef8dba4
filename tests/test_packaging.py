"""The wheel the images install carries every module, recipe, policy and sample: checked in a clean venv."""

import shutil
import site
import subprocess
import sys

from conftest import REPO

CHECK = r"""
import importlib, pkgutil, sys
from pathlib import Path
import nightshift
root = Path(nightshift.__file__).parent
assert str(root).startswith(sys.prefix), f"imported {root}, not the wheel"
for info in pkgutil.walk_packages([str(root)], "nightshift."):
    importlib.import_module(info.name)
from nightshift.evaluation.gate import GatePolicy
from nightshift.quality.suite import QualityPolicy
from nightshift.settings import CONFIG_DIR, GOLDEN_QA, SAMPLE_STORE
from nightshift.training.recipe import TrainingRecipe
recipes = sorted(p.stem for p in (CONFIG_DIR / "training").glob("*.yaml"))
for name in recipes:
    TrainingRecipe.load(name)
GatePolicy.load(); QualityPolicy.load()
from nightshift.monitoring.drift import DriftPolicy
from nightshift.reports.pages import TEMPLATES
DriftPolicy.load()
pages = {p.name for p in TEMPLATES.glob("*.html")}
assert pages >= {"base.html", "ingest_run.html", "finetune_run.html", "overview.html"}, pages
assert GOLDEN_QA.is_file() and any(SAMPLE_STORE.rglob("*.md"))
print("modules", len(list(pkgutil.walk_packages([str(root)], "nightshift."))), "recipes", recipes)
"""


def test_the_wheel_in_a_clean_venv_has_everything(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    # Built from the files a checkout holds, as the images copy them: a stale build/ folder (setuptools builds in
    # the tree and never empties build/lib) would hide a module the package list lacks.
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(tmp_path / "w")],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "w").glob("nightshift-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    # The dependencies come from the project's environment as a plain path: its .pth files (the editable
    # install of this checkout among them) are not processed, so `nightshift` can only come from the wheel.
    (target / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                             "NIGHTSHIFT_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sources = [p for p in (REPO / "include" / "nightshift").rglob("*.py") if p.name != "__init__.py"]
    assert f"modules {len(sources) + len(list((REPO / 'include' / 'nightshift').glob('*/__init__.py')))}" in \
        proc.stdout, proc.stdout
    assert "default" in proc.stdout, proc.stdout
