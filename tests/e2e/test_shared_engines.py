"""Two installations (two NIGHTSHIFT_HOMEs, as two machines would have) on the production profile's engines, all
real and on 127.0.0.1: PostgreSQL, an MLflow tracking server with its artifacts proxied to an S3 API (moto's
server mode), a DVC remote in the same bucket and a shared git history of the dataset versions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make engines installs Debian's)")
    from nightshift.engines import LocalEngines

    with LocalEngines(tmp_path_factory.mktemp("engines")) as running:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AIRFLOW_CONN_NIGHTSHIFT_S3", running.s3_connection())
            # Small parts, so that the test's checkpoint (12 MiB) goes up in three.
            patch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
            patch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(5 * MIB))
            patch.setenv("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", str(5 * MIB))
            yield running


def installation(engines, home: Path):
    """Return the settings of one installation on the shared engines, as NIGHTSHIFT_PROFILE=production-local has."""
    from nightshift.settings import load_settings

    env = engines.environment()
    return dataclasses.replace(
        load_settings(), home=home, profile="production-local",
        tracking_uri_override=env["NIGHTSHIFT_MLFLOW_TRACKING_URI"], lease_db_override=env["NIGHTSHIFT_LEASE_DB"],
        dvc_remote_url=env["NIGHTSHIFT_DVC_REMOTE"], data_git_remote=env["NIGHTSHIFT_DATA_GIT_REMOTE"])


def corpus(path: Path, n: int, tag: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"{tag}-{i}", "text": f"{tag} document {i}"}) + "\n" for i in range(n)))
    return path


def version_many(settings, names: list[str], work: Path, out) -> None:
    """Version one corpus per name from this installation (a process of its own, as another machine would be)."""
    from nightshift.stores import dataset_repository

    repo = dataset_repository(settings)
    for name in names:
        version = repo.commit(corpus(work / f"{name}.jsonl", 3, name), {"documents": 3})
        out.put((name, version.tag, version.md5))


def test_two_installations_share_dataset_versions_through_the_s3_remote_and_the_git_history(engines, tmp_path):
    from nightshift.stores import dataset_repository

    first = installation(engines, tmp_path / "machine-a")
    second = installation(engines, tmp_path / "machine-b")
    repo_a = dataset_repository(first)
    made = repo_a.commit(corpus(tmp_path / "a.jsonl", 5, "night-1"), {"documents": 5})
    assert made.tag == "corpus-v0001" and repo_a.remote_has(made)
    keys = [o["Key"] for o in engines.s3_client().list_objects_v2(Bucket="nightshift", Prefix="dvc/")["Contents"]]
    assert keys == [f"dvc/files/md5/{made.md5[:2]}/{made.md5[2:]}"]
    assert "secret_access_key" not in (first.data_repo / ".dvc" / "config").read_text()  # the key stays untracked

    repo_b = dataset_repository(second)
    seen = repo_b.get("corpus-v0001")  # made on the other machine: learnt from the shared history
    assert seen.md5 == made.md5 and not (second.data_repo / ".dvc" / "cache").exists()
    pulled = repo_b.fetch(seen, tmp_path / "pulled.jsonl")  # bytes from S3, checked against the version's hash
    assert pulled.read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    again = repo_b.commit(corpus(tmp_path / "same.jsonl", 5, "night-1"), {"documents": 5})
    assert again.tag == "corpus-v0001" and not again.created  # the same bytes from the other machine: no new version

    # Both machines version three corpora each at once: every one gets its own number, none is lost or doubled.
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    racers = [ctx.Process(target=version_many, args=(s, [f"{who}-{i}" for i in range(3)], tmp_path / who, out))
              for who, s in (("a", first), ("b", second))]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=240)
        assert racer.exitcode == 0
    results = [out.get(timeout=5) for _ in range(6)]
    tags = sorted(tag for _, tag, _ in results)
    assert tags == [f"corpus-v{n:04d}" for n in range(2, 8)]
    assert len({md5 for _, _, md5 in results}) == 6
    for repo in (repo_a, repo_b):
        for _, tag, md5 in results:
            assert repo.get(tag).md5 == md5
        assert repo.versions() == [f"corpus-v{n:04d}" for n in range(1, 8)]


def test_a_checkpoint_goes_up_in_parts_and_the_other_machine_verifies_what_it_downloads(engines, tmp_path):
    from nightshift.registry.lease import LeaseTimeout, registry_lease
    from nightshift.registry.mlflow_registry import IncompleteCheckpoint
    from nightshift.stores import registry_for

    first = registry_for(installation(engines, tmp_path / "machine-a"))
    second = registry_for(installation(engines, tmp_path / "machine-b"))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(bytes(range(256)) * (12 * MIB // 256))
    run_id = first.open_run("shared", "night-1", "night-1", {})
    first.upload_checkpoint(run_id, checkpoint)
    version = first.promote(first.register(run_id, tags={"nightshift.dataset_tag": "corpus-v0001"}))

    s3 = engines.s3_client()
    objects = {o["Key"].rsplit("/", 1)[-1]: o for o in s3.list_objects_v2(Bucket="nightshift",
                                                                           Prefix="mlflow/")["Contents"]}
    assert objects["model.safetensors"]["ETag"].strip('"').endswith("-3")  # three parts, straight to S3
    champion = second.champion()
    assert champion.version == version.version
    folder = second.download(champion, tmp_path / "cache-b")
    assert (folder / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()

    # What the bucket holds is checked against the manifest, and the manifest against the hash the registry
    # (PostgreSQL, not the bucket) keeps: changed weights, changed weights with a manifest to match, an added
    # file, each is refused, never served.
    key = next(k["Key"] for k in s3.list_objects_v2(Bucket="nightshift", Prefix="mlflow/")["Contents"]
               if k["Key"].endswith("model.safetensors"))
    prefix = key.rsplit("/", 1)[0]
    s3.put_object(Bucket="nightshift", Key=f"{prefix}/tokenizer_config.json", Body=b"{}")
    with pytest.raises(IncompleteCheckpoint, match="does not list: tokenizer_config.json"):
        second.download(champion, tmp_path / "cache-c")
    s3.delete_object(Bucket="nightshift", Key=f"{prefix}/tokenizer_config.json")
    s3.put_object(Bucket="nightshift", Key=key, Body=b"\0" * 1024)
    with pytest.raises(IncompleteCheckpoint, match="model.safetensors differs"):
        second.download(champion, tmp_path / "cache-d")
    forged = {"files": {"config.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
                        "model.safetensors": {"size": 1024, "sha256": hashlib.sha256(b"\0" * 1024).hexdigest()}}}
    s3.put_object(Bucket="nightshift", Key=f"{prefix}/MANIFEST.json", Body=json.dumps(forged).encode())
    with pytest.raises(IncompleteCheckpoint, match="differs from the one registered"):
        second.download(champion, tmp_path / "cache-e")
    assert not (tmp_path / "cache-e" / f"nightshift-llm-v{champion.version}").exists()

    # Moves of the champion from both machines are serialized by one PostgreSQL advisory lock.
    with registry_lease(first, "promotion finetune_model/machine-a"):
        with pytest.raises(LeaseTimeout, match="machine-a"):
            with registry_lease(second, "rollback rollback_model/machine-b", timeout_s=0.5):
                pass


def test_a_second_owner_of_the_engines_folder_is_refused_and_bad_settings_name_their_variable(engines, monkeypatch):
    from nightshift.engines import LocalEngines
    from nightshift.settings import load_settings

    with pytest.raises(RuntimeError, match="in use by pid"):
        LocalEngines(engines.root).start()  # the running engines are left alone
    assert engines.s3_client().list_buckets()["Buckets"]
    for variable, value in (("NIGHTSHIFT_LEASE_DB", "postgres://db/nightshift"), ("NIGHTSHIFT_DVC_REMOTE", "s3:/x"),
                            ("NIGHTSHIFT_DVC_REMOTE", "gs://bucket/dvc"), ("NIGHTSHIFT_DATA_GIT_REMOTE", "data.git"),
                            ("NIGHTSHIFT_PROFILE", "prod")):
        with monkeypatch.context() as patch:
            patch.setenv(variable, value)
            with pytest.raises(ValueError, match=variable):
                load_settings()
    with monkeypatch.context() as patch:  # a tracking server over HTTP and no lease database on a deployment
        patch.setenv("NIGHTSHIFT_PROFILE", "production")
        patch.setenv("NIGHTSHIFT_MLFLOW_TRACKING_URI", engines.tracking_uri)
        with pytest.raises(ValueError, match="NIGHTSHIFT_LEASE_DB must name a PostgreSQL database"):
            load_settings()
