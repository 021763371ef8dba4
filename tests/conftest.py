"""Test session set-up: a private NIGHTSHIFT_HOME, Airflow pointed at it, a migrated metadata DB.

Environment variables are set at import time, before any test module imports Airflow (Airflow reads its
configuration on import).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="nightshift-tests-"))
# Each pytest process (the controller and every xdist worker) imports this file and owns one home of half a gigabyte
# (an imported SmolLM2 among it): removed when the process exits, or a machine's disk fills after a few dozen runs.
atexit.register(shutil.rmtree, SESSION_HOME, ignore_errors=True)
os.environ["NIGHTSHIFT_HOME"] = str(SESSION_HOME)
# Tests build document stores in temporary folders and train with a recipe of their own.
os.environ["NIGHTSHIFT_SOURCE_ROOTS"] = ",".join([
    str(Path(__file__).resolve().parent.parent / "include" / "samples" / "store"), tempfile.gettempdir()])
os.environ["NIGHTSHIFT_RECIPE_DIRS"] = str(Path(__file__).resolve().parent / "e2e" / "recipes")
os.environ["NIGHTSHIFT_RETRY_DELAY_S"] = "1"  # dag.test() waits out retry delays; fault tests retry for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ["NIGHTSHIFT_MASTER_PORT"] = str(free_port())

from nightshift.environment import ensure_airflow_config, runtime_env  # noqa: E402
from nightshift.settings import load_settings, repo_root  # noqa: E402

ensure_airflow_config(load_settings())
(SESSION_HOME / "lineage").mkdir()
for _key, _value in runtime_env(load_settings()).items():
    os.environ[_key] = _value
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"

REPO = repo_root()
TESTS = Path(__file__).resolve().parent

SERIAL = frozenset({
    "serving/test_hostile.py", "serving/test_soak.py", "serving/test_feedback.py", "serving/test_load.py",
    "serving/test_upstream.py", "sources/test_web.py", "dags/test_dag_integrity.py",
})
"""Modules whose tests assert on wall-clock time: marked ``serial``, run by ``make test`` after the others, alone."""


HEAVY = ("e2e/test_up.py", "e2e/test_production.py", "e2e/test_faults.py", "training/test_trainer.py",
         "e2e/test_cycle.py", "e2e/test_prompt_release.py", "e2e/test_real_manuals.py", "e2e/test_monitor.py",
         "e2e/test_foundation_selection.py",
         "airflow/test_kubernetes.py", "e2e/test_sources.py", "e2e/test_shared_engines.py")
"""The longest modules, heaviest first: pytest-xdist hands out whole files in collection order, so starting these
first keeps the two workers busy to the end (longest-first) instead of leaving one to finish a long file alone."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix() in SERIAL:
            item.add_marker(pytest.mark.serial)

    def weight(item) -> int:
        path = Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()
        return HEAVY.index(path) if path in HEAVY else len(HEAVY)

    items.sort(key=weight)  # stable: the tests of a file keep their order


@pytest.fixture(scope="session")
def settings():
    return load_settings()


@pytest.fixture(scope="session")
def airflow_db(settings):
    """Migrate the session's metadata DB and apply airflow_settings.yaml, as `make setup` does."""
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    from nightshift.airflow.settings_file import apply_settings_file

    apply_settings_file(REPO / "airflow_settings.yaml")
    return settings


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer and chat template, imported from the bundled GGUF file."""
    from nightshift.training.foundation import import_tokenizer

    return import_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(settings, tokenizer_dir) -> Path:
    """A randomly initialised model of SmolLM2's architecture (Llama), small enough to train in seconds."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = settings.models_dir / "tiny-smollm2"
    if (dest / "config.json").is_file():
        return dest
    config = AutoConfig.for_model(
        "llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(dest)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, dest / item.name)
    return dest


@pytest.fixture(scope="session")
def smollm2(settings) -> Path:
    """The real SmolLM2-135M-Instruct, imported once per session from the bundled GGUF file."""
    from nightshift.settings import DEFAULT_FOUNDATION_MODEL
    from nightshift.training.foundation import import_foundation_model

    return import_foundation_model(settings.models_dir / DEFAULT_FOUNDATION_MODEL)


@pytest.fixture(scope="session")
def train_blocks(tmp_path_factory) -> Path:
    """40 blocks of 64 tokens: shifted copies of one random sequence, so a tiny model learns within a few steps."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.integers(3, 4000, size=64)
    path = tmp_path_factory.mktemp("blocks") / "train.npy"
    np.save(path, np.stack([np.roll(base, i) for i in range(40)]).astype(np.int32))
    return path


@pytest.fixture(scope="session")
def champion(tmp_path_factory, tiny_model):
    """A registry whose champion is the tiny model (v1, dataset ds-one), shared by every test that only reads it."""
    from helpers import local_registry, publish

    registry = local_registry(tmp_path_factory.mktemp("champion"))
    publish(registry, tiny_model, "one")
    return registry


@pytest.fixture(scope="session")
def long_window_model(tmp_path_factory, tokenizer_dir):
    """A random model of SmolLM2's architecture with a 2,048-token window, for a long scoring prompt."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = tmp_path_factory.mktemp("long-window")
    config = AutoConfig.for_model(
        "llama", vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, dest / item.name)
    return dest
