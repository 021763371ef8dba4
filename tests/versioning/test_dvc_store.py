import os
import shutil
import subprocess
import sys
import time

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
    assert log.count("documents (md5") == 2


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


KILL_POINTS = ["versioning.after_stage", "versioning.after_push", "versioning.after_commit", "versioning.after_tag"]


def commit_in_a_worker_that_dies(repo, corpus, point):
    """Run commit() in another process that is killed (SIGKILL) at a fault point."""
    code = ("import sys; from pathlib import Path; from nightshift.versioning.dvc_store import DatasetRepository; "
            "DatasetRepository(Path(sys.argv[1]), Path(sys.argv[2])).commit(Path(sys.argv[3]), {'documents': 1})")
    proc = subprocess.run([sys.executable, "-c", code, str(repo.root), str(repo.remote), str(corpus)],
                          env={**os.environ, "NIGHTSHIFT_FAULT": point}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_worker_killed_anywhere_in_commit_is_recovered_by_the_retry(tmp_path, point):
    reference = DatasetRepository(tmp_path / "ref", tmp_path / "ref-remote")
    corpus = write(tmp_path / "c.jsonl", '{"id": "a", "text": "x"}\n')
    expected = reference.commit(corpus, {"documents": 1})

    repo = DatasetRepository(tmp_path / "repo", tmp_path / "remote")
    repo.ensure()
    commit_in_a_worker_that_dies(repo, corpus, point)
    retried = repo.commit(corpus, {"documents": 1})
    assert retried.tag == expected.tag == "corpus-v0001" and retried.md5 == expected.md5
    assert retried.created == (point != "versioning.after_tag")  # publishing is decided by asset events
    assert repo.versions() == ["corpus-v0001"] and repo.remote_has(retried)
    assert repo.commit(corpus, {"documents": 1}).tag == "corpus-v0001"  # and the night after
    shutil.rmtree(repo.root / ".dvc" / "cache")
    assert repo.fetch(retried, tmp_path / "out.jsonl").read_bytes() == corpus.read_bytes()
    commits = subprocess.run(["git", "log", "--format=%s"], cwd=repo.root, capture_output=True, text=True).stdout
    assert commits.count("documents (md5") == 1


def test_tag_numbers_continue_from_the_highest_tag(repo, tmp_path):
    corpus = tmp_path / "c.jsonl"
    for text in ("one\n", "two\n"):
        repo.commit(write(corpus, text), {"documents": 1})
    subprocess.run(["git", "tag", "-d", "corpus-v0001"], cwd=repo.root, check=True, capture_output=True)
    assert repo.commit(write(corpus, "three\n"), {"documents": 1}).tag == "corpus-v0003"


def test_a_version_carries_its_profile_and_returns_it_by_tag(repo, tmp_path):
    profile = tmp_path / "profile.bin"
    profile.write_bytes(b"\x00profile-one\xff")
    v1 = repo.commit(write(tmp_path / "c.jsonl", '{"id": "a"}\n'), {"documents": 1}, {"profile.bin": profile})
    profile.write_bytes(b"\x00profile-two\xff")
    v2 = repo.commit(write(tmp_path / "c.jsonl", '{"id": "b"}\n'), {"documents": 1}, {"profile.bin": profile})
    v3 = repo.commit(write(tmp_path / "c.jsonl", '{"id": "c"}\n'), {"documents": 1})
    assert repo.read_companion(v1.tag, "profile.bin") == b"\x00profile-one\xff"
    assert repo.read_companion(v2.tag, "profile.bin") == b"\x00profile-two\xff"
    assert repo.read_companion(v3.tag, "profile.bin") is None  # no profile: not the previous version's
    with pytest.raises(ValueError, match="not a companion"):
        repo.read_companion(v1.tag, "../../etc/passwd")
    with pytest.raises(LookupError):
        repo.read_companion("corpus-v0099", "profile.bin")


RACER = """
import sys, time
from pathlib import Path
import dvc.repo  # imported before the start line, so that the six calls meet inside commit()
from nightshift.versioning.dvc_store import DatasetRepository
root, remote, corpus, ready, go = map(Path, sys.argv[1:6])
ready.touch()
while not go.exists():
    time.sleep(0.005)
print(DatasetRepository(root, remote).commit(corpus, {"documents": 1}).tag)
"""


def assert_clean_with_one_version(repo, corpus, tmp_path):
    """The repository holds exactly one version of ``corpus``, DVC tracks the corpus, git's tree is clean."""
    assert repo.versions() == ["corpus-v0001"]
    assert repo.get("corpus-v0001").md5 == repo.commit(corpus, {"documents": 1}).md5
    assert git(repo, "status", "--porcelain") == ""
    assert repo.data_path not in git(repo, "ls-files").split()  # in DVC, not in git
    assert git(repo, "log", "--format=%s").count("documents (md5") == 1
    shutil.rmtree(repo.root / ".dvc" / "cache", ignore_errors=True)
    assert repo.fetch(repo.latest(), tmp_path / "back.jsonl").read_bytes() == corpus.read_bytes()
    v2 = repo.commit(write(tmp_path / "next.jsonl", '{"id": "b"}\n'), {"documents": 1})  # and the night after
    assert v2.tag == "corpus-v0002" and git(repo, "status", "--porcelain") == ""


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo.root, capture_output=True, text=True, check=True).stdout.strip()


def test_six_processes_creating_the_first_version_together_make_one(repo, tmp_path):
    corpus = write(tmp_path / "c.jsonl", '{"id": "a", "text": "x"}\n')
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(repo.root), str(repo.remote), str(corpus),
                               str(tmp_path / f"ready-{i}"), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(6)) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    failed = [err[-1500:] for p, (_, err) in zip(procs, results, strict=True) if p.returncode != 0]
    assert not failed, failed
    assert [out.split()[-1] for out, _ in results] == ["corpus-v0001"] * 6
    assert git(repo, "log", "--format=%s").splitlines() == [
        f"1 documents (md5 {repo.get('corpus-v0001').md5})", "Initialise data repository"]
    assert_clean_with_one_version(repo, corpus, tmp_path)


def half_initialised(repo, corpus, state):
    """Leave ``repo`` as a first creation interrupted in ``state`` left it."""
    from dvc.repo import Repo

    repo.root.mkdir(parents=True)
    subprocess.run(["git", "init", "--quiet", "--initial-branch=main"], cwd=repo.root, check=True)
    if state == "git only":
        return
    if state == "dvc folder without its files":
        (repo.root / ".dvc" / "tmp").mkdir(parents=True)
        return
    Repo.init(str(repo.root)).close()
    if state == "dvc without a remote":
        return
    DatasetRepository(repo.root, repo.remote)._ensure()  # then undo its commit: killed while committing
    subprocess.run(["git", "update-ref", "-d", "HEAD"], cwd=repo.root, check=True)
    if state == "first commit half written":
        (repo.root / ".git" / "index.lock").write_text("")
        return
    assert state == "corpus committed into git"  # the outcome of the race: a copy taken by the other's git add
    (repo.root / "corpus").mkdir()
    shutil.copyfile(corpus, repo.root / repo.data_path)
    subprocess.run(["git", "add", "-A"], cwd=repo.root, check=True)
    subprocess.run(["git", "-c", "user.name=x", "-c", "user.email=x@x", "commit", "--quiet", "-m",
                    "Initialise data repository"], cwd=repo.root, check=True)


@pytest.mark.parametrize("state", ["git only", "dvc folder without its files", "dvc without a remote",
                                   "first commit half written", "corpus committed into git"])
def test_a_half_initialised_repository_is_finished_by_the_next_version(repo, tmp_path, state):
    corpus = write(tmp_path / "c.jsonl", '{"id": "a", "text": "x"}\n')
    half_initialised(repo, corpus, state)
    version = repo.commit(corpus, {"documents": 1})
    assert version.created and version.tag == "corpus-v0001" and repo.remote_has(version)
    assert_clean_with_one_version(repo, corpus, tmp_path)


@pytest.mark.parametrize("point", ["versioning.init_after_git", "versioning.init_after_dvc",
                                   "versioning.init_after_config"])
def test_a_worker_killed_while_creating_the_repository_is_recovered_by_the_retry(repo, tmp_path, point):
    corpus = write(tmp_path / "c.jsonl", '{"id": "a", "text": "x"}\n')
    commit_in_a_worker_that_dies(repo, corpus, point)
    assert repo.root.is_dir() and not repo.versions()
    version = repo.commit(corpus, {"documents": 1})
    assert version.created and version.tag == "corpus-v0001"
    assert git(repo, "log", "--format=%s").splitlines()[-1] == "Initialise data repository"
    assert_clean_with_one_version(repo, corpus, tmp_path)


def test_lock_files_a_killed_git_left_do_not_refuse_later_versions(repo, tmp_path):
    first = repo.commit(write(tmp_path / "a.jsonl", '{"id": "a", "text": "x"}\n'), {"documents": 1})
    git_dir = repo.root / ".git"
    stale = [git_dir / "HEAD.lock", git_dir / "refs" / "heads" / "main.lock", git_dir / "index.lock",
             git_dir / "refs" / "tags" / "corpus-v0002.lock"]
    for path in stale:  # what a git killed while committing or tagging leaves behind
        path.write_text("")
    second = repo.commit(write(tmp_path / "b.jsonl", '{"id": "b", "text": "y"}\n'), {"documents": 1})
    assert (first.tag, second.tag) == ("corpus-v0001", "corpus-v0002") and second.created
    assert repo.remote_has(second) and not any(path.exists() for path in stale)
    assert git(repo, "status", "--porcelain") == ""


def corpus(path, text: str):
    return write(path, '{"id": "d1", "text": "' + text + '"}\n')


def shared(tmp_path, name: str, git_remote) -> DatasetRepository:
    """An installation whose versions go to a shared git history and a shared (folder) DVC remote."""
    return DatasetRepository(tmp_path / name / "data-repo", tmp_path / "remote", git_remote=str(git_remote))


def test_a_shared_history_that_refuses_pushes_is_an_error_that_says_so(tmp_path):
    """A protected main (a hook, branch protection) refuses every push: that is said once, not retried as a race."""
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origin)], check=True)
    first = shared(tmp_path, "a", origin)
    first.commit(corpus(tmp_path / "one.jsonl", "first night"), {"documents": 1})
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'main is protected' >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(RuntimeError, match="(?s)refused the push of main: .*pre-receive hook declined"):
        first.commit(corpus(tmp_path / "two.jsonl", "second night"), {"documents": 1})
    assert [t for t in subprocess.run(["git", "tag"], cwd=origin, capture_output=True, text=True).stdout.split()] \
        == ["corpus-v0001"]


def test_a_git_remote_that_is_not_a_dataset_history_is_refused(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk")
    with pytest.raises(RuntimeError, match="neither empty nor a bare git repository"):
        shared(tmp_path, "a", notes).ensure()
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]  # nothing written into someone's folder
    code = tmp_path / "code.git"
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(code)], check=True)
    work = tmp_path / "code"
    subprocess.run(["git", "clone", "--quiet", str(code), str(work)], check=True, capture_output=True)
    (work / "app.py").write_text("print('the product')\n")
    for args in (["add", "app.py"], ["-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "product"],
                 ["push", "-q", "origin", "HEAD:main"]):
        subprocess.run(["git", *args], cwd=work, check=True, capture_output=True)
    with pytest.raises(RuntimeError, match="not a dataset history"):
        shared(tmp_path, "b", code).ensure()
    log = subprocess.run(["git", "log", "--oneline", "main"], cwd=code, capture_output=True, text=True).stdout
    assert len(log.splitlines()) == 1  # the code repository was not written to
