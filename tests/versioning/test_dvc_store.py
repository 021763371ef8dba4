import shutil
import subprocess

import pytest

from nightshift.versioning.dvc_store import DatasetRepository


@pytest.fixture
def repo(tmp_path):
    return DatasetRepository(tmp_path / "repo", tmp_path / "remote")


def write(path, text):
    path.write_text(text)
    return path


def test_commit_tags_pushes_and_is_idempotent(repo, tmp_path):
    corpus = write(tmp_path / "c.jsonl", '{"id": "a"}\n')
    v1 = repo.commit(corpus, {"documents": 1})
    assert v1.created and v1.tag == "corpus-v0001" and v1.documents == 1
    assert repo.remote_has(v1)
    again = repo.commit(corpus, {"documents": 1})
    assert not again.created and again.tag == v1.tag and again.rev == v1.rev
    v2 = repo.commit(write(corpus, '{"id": "a"}\n{"id": "b"}\n'), {"documents": 2})
    assert v2.tag == "corpus-v0002" and v2.md5 != v1.md5
    assert repo.versions() == ["corpus-v0001", "corpus-v0002"]
    assert repo.latest() == repo.get("corpus-v0002")
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo.root, capture_output=True, text=True).stdout
    assert log.count("corpus-v") == 2


def test_going_back_to_old_bytes_reuses_the_old_version(repo, tmp_path):
    corpus = write(tmp_path / "c.jsonl", "one\n")
    v1 = repo.commit(corpus, {"documents": 1})
    repo.commit(write(corpus, "two\n"), {"documents": 1})
    back = repo.commit(write(corpus, "one\n"), {"documents": 1})
    assert back.tag == v1.tag and not back.created


def test_fetch_returns_exact_bytes_from_the_remote(repo, tmp_path):
    v1 = repo.commit(write(tmp_path / "c.jsonl", "first\n"), {"documents": 1})
    repo.commit(write(tmp_path / "c.jsonl", "second\n"), {"documents": 1})
    shutil.rmtree(repo.root / ".dvc" / "cache")  # only the remote holds the bytes now
    out = repo.fetch(v1, tmp_path / "out" / "c.jsonl")
    assert out.read_text() == "first\n"


def test_unknown_version_is_a_clear_error(repo, tmp_path):
    repo.commit(write(tmp_path / "c.jsonl", "x\n"), {"documents": 1})
    with pytest.raises(LookupError, match="corpus-v0009.*known: corpus-v0001"):
        repo.get("corpus-v0009")
