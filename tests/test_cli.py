"""The CLI: `nightshift keys` shows a key once at creation, never lists it, and revocation takes effect; settings
apply idempotently; history answers who was champion when; the cycle summary. (`nightshift setup` in a fresh
installation: tests/e2e/test_up.py, which serves that installation.)"""

import os
import subprocess
import sys

from helpers import home_registry
from nightshift.serving.keys import KEY_PATTERN, KeyRing, KeyStore


def nightshift(home, *args):
    env = {**os.environ, "NIGHTSHIFT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "nightshift.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_keys_create_list_revoke(tmp_path):
    created = nightshift(tmp_path, "keys", "create", "--name", "dashboard")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.fullmatch(key)
    ring = KeyRing(KeyStore(tmp_path / "serving" / "api_keys.json"), recheck_seconds=0)
    assert ring.identify(key)

    listed = nightshift(tmp_path, "keys", "list")
    assert "dashboard" in listed.stdout and key not in listed.stdout and key[-4:] in listed.stdout

    assert nightshift(tmp_path, "keys", "revoke", "nobody").returncode == 1
    revoked = nightshift(tmp_path, "keys", "revoke", "dashboard")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert ring.identify(key) is None


def test_apply_settings_is_idempotent(airflow_db):
    proc = subprocess.run([sys.executable, "-m", "nightshift.cli", "apply-settings", "--wait", "30"],
                          env=os.environ.copy(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ": 0 changes" in proc.stderr + proc.stdout


def test_history_lists_moves_and_answers_who_was_champion_when(tmp_path, monkeypatch, tiny_model, capsys):
    import time
    from datetime import UTC, datetime

    from nightshift.cli import main
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    registry = home_registry(load_settings())
    versions = []
    for key in ("one", "two"):
        run_id = registry.open_run("finetune_model", key, key, {})
        registry.upload_checkpoint(run_id, tiny_model)
        versions.append(registry.register(run_id, tags={}))
    registry.promote(versions[0], key="a", by="schedule", dag_run="finetune_model/night-1", reason="gate passed")
    time.sleep(0.05)
    between = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    registry.promote(versions[1], key="b", kind="rollback", by="ada", dag_run="rollback_model/r1",
                     reason="bad   answers\nabout tickets")
    capsys.readouterr()
    umask = os.umask(0o022)
    os.umask(umask)
    monkeypatch.setattr("nightshift.cli.PRIVATE_UMASK", umask)  # main() sets it for the whole process
    assert main(["history"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "- -> v1" in out[1] and "promotion" in out[1] and "finetune_model/night-1" in out[1]
    assert "v1 -> v2" in out[2] and "ada" in out[2] and out[2].endswith("bad answers about tickets")
    assert main(["history", "--at", between]) == 0
    assert "v1 was champion" in capsys.readouterr().out
    assert main(["history", "--at", "2000-01-01"]) == 0
    assert "had no champion" in capsys.readouterr().out
    assert main(["history", "--at", "whenever"]) == 2


def test_the_summary_prints_every_metric_with_its_interval_non_finite_ones_included():
    from nightshift.cli.cycle import metric_lines

    lines = metric_lines([
        {"metric": "golden.token_f1", "candidate": 0.31, "baseline": 0.25, "difference": 0.06, "low": -0.02,
         "high": 0.14},
        {"metric": "heldout.perplexity", "candidate": "inf", "baseline": 12.5, "difference": "inf", "low": "nan",
         "high": "nan", "relative": True},
        {"metric": "judge.correctness", "unmeasured": "no Airflow connection 'nightshift_judge'"},
    ], "champion nightshift-llm v3")
    assert "+0.060 [-0.020, +0.140]" in lines[1]
    assert "inf" in lines[2] and "[+nan, +nan] rel" in lines[2]
    assert "not measured: no Airflow connection" in lines[3]


def test_the_summary_says_whether_retrieval_fine_tuning_or_both_answer_best():
    from nightshift.cli.cycle import retrieval_lines

    lines = retrieval_lines({
        "items": 8, "top_k": 4, "recall_at_k": 0.875, "key_metric": "golden.token_f1", "best": "fine-tuned+RAG",
        "best_note": "better than fine-tuned alone: its golden.token_f1 interval lies above 0",
        "variants": [{"name": "base", "metrics": {"golden.token_f1": 0.1},
                      "vs_finetuned": {"difference": -0.05, "low": -0.1, "high": None}},
                     {"name": "fine-tuned", "metrics": {"golden.token_f1": 0.15}},
                     {"name": "fine-tuned+RAG", "metrics": {"golden.token_f1": None},
                      "vs_finetuned": {"difference": 0.2, "low": 0.1, "high": 0.3}}]})
    assert "recall@4 0.88" in lines[0]
    assert "-0.050 [-0.100, n/a]" in lines[1] and lines[2].strip() == "fine-tuned      0.150"
    assert "n/a (+0.200 [+0.100, +0.300])" in lines[3] and "best: fine-tuned+RAG" in lines[4]
    assert retrieval_lines({"skipped": "no index"}) == ["retrieval not compared: no index"]
    assert retrieval_lines(None) == []
