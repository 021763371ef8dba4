"""Dataset versions in a git + DVC data repository with a DVC remote.

A version is a git commit that changes ``<name>/<file>.dvc`` (the content hash) and ``<name>/meta.json``
(counts), tagged ``<name>-vNNNN``; its bytes live in the DVC cache and are pushed to the remote.
Versioning identical bytes again returns the existing version instead of creating one.

Creating a version is one recoverable step, in the order stage -> push -> commit -> tag, so that a tag
always names bytes the remote holds. Each part is skipped when a killed earlier attempt already did it (an
untagged commit of the same bytes is tagged, not committed again), and one lock serialises the processes
that share the repository. The lock is a file beside the repository folder, so it exists before the
repository does and covers its creation too: two first nights started together create it once, and a
creation killed halfway (git initialised but not DVC, no first commit, stale git lock files, or a corpus
file that reached git itself) is finished or repaired by the next call, never left for a person to fix.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import yaml

from nightshift.faults import fault_point
from nightshift.records import DatasetVersion

log = logging.getLogger(__name__)

REMOTE_NAME = "storage"
PUBLISH_ATTEMPTS = 20
"""Times a version is tried again after another installation published to the shared history first."""
COMPANIONS = ("profile.bin",)
"""Files a version may carry in git beside its corpus (small; the corpus itself lives in DVC)."""


class DatasetRepository:
    """A data repository holding versions of one dataset."""

    def __init__(self, root: Path, remote: Path | str, name: str = "corpus", filename: str = "corpus.jsonl",
                 remote_config: dict[str, str] | None = None, git_remote: str | None = None) -> None:
        self.root = Path(root)
        # A folder, or an s3:// URL whose credentials and endpoint (remote_config) stay in the untracked
        # .dvc/config.local: another installation sharing the history reaches the same bucket with its own.
        self.remote_url = str(remote)
        self.remote = None if self.remote_url.startswith("s3://") else Path(remote)
        self.remote_config = dict(remote_config or {})
        self.git_remote = git_remote
        self.name = name
        self.filename = filename
        self._lock_depth = 0

    @property
    def data_path(self) -> str:
        return f"{self.name}/{self.filename}"

    def _git(self, *args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed in {self.root}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def _repo(self):
        from dvc.repo import Repo

        return Repo(str(self.root))

    def ensure(self) -> None:
        """Create the git + DVC repository and its local remote, or finish one a killed or raced call left."""
        with self.locked():
            self._ensure()

    def _ensure(self) -> None:
        """Bring the repository to its initialised state, skipping each part already done; hold the lock."""
        from dvc.repo import Repo

        if self.remote is not None:
            self.remote.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        git_dir = self.root / ".git"
        if not (git_dir / "HEAD").is_file():
            self._git("init", "--quiet", "--initial-branch=main")
        fault_point("versioning.init_after_git")
        self._remove_stale_git_locks(git_dir)
        for key, value in (("user.name", "nightshift"), ("user.email", "nightshift@localhost"),
                           ("commit.gpgsign", "false")):
            if self._git_config(key) != value:
                self._git("config", key, value)
        if self.git_remote:
            self._ensure_git_remote()
        if not (self.root / ".dvc" / "config").is_file() or not (self.root / ".dvcignore").is_file():
            # DVC refuses to initialise over a .dvc folder; one without its files is what a killed init left.
            Repo.init(str(self.root), force=True).close()
        fault_point("versioning.init_after_dvc")
        with self._repo() as repo:
            wanted = {"url": str(self.remote.resolve()) if self.remote is not None else self.remote_url}
            config = repo.config.read("repo")
            if (config.get("remote", {}).get(REMOTE_NAME) != wanted
                    or config.get("core", {}).get("remote") != REMOTE_NAME):
                with repo.config.edit() as conf:
                    conf["remote"][REMOTE_NAME] = wanted
                    conf["core"]["remote"] = REMOTE_NAME
                    conf["core"]["analytics"] = "false"
                    conf["core"]["autostage"] = "true"
            if repo.config.read("local").get("remote", {}).get(REMOTE_NAME, {}) != self.remote_config:
                with repo.config.edit("local") as conf:
                    conf["remote"][REMOTE_NAME] = dict(self.remote_config)
        local_config = self.root / ".dvc" / "config.local"
        if local_config.is_file():
            local_config.chmod(0o600)  # the storage's credentials: this user's alone, whatever the umask
        fault_point("versioning.init_after_config")
        own = [p for p in (".dvc/config", ".dvc/.gitignore", ".dvcignore") if (self.root / p).is_file()]
        self._git("add", "--", *own)
        born = self._has_head()
        data_in_git = bool(born and self._git("ls-tree", "--name-only", "HEAD", "--", self.data_path))
        if born and not data_in_git and not self._git("diff", "--cached", "--name-only", "--", *own):
            return
        # Only the repository's own files go into this commit: version files a killed commit() staged are
        # unstaged (commit() stages them again), and a corpus that reached git leaves it (DVC tracks it).
        if born:
            self._git("reset", "--quiet", "HEAD", "--", self.name)
        else:
            self._git("rm", "-r", "--cached", "--quiet", "--ignore-unmatch", "--", self.name)
        if data_in_git:
            log.warning("%s was committed to git, not DVC: removing it from git's index", self.data_path)
            self._git("rm", "--cached", "--quiet", "--", self.data_path)
        message = "Repair data repository" if born else "Initialise data repository"
        self._git("commit", "--quiet", "-m", message)
        log.info("%s %s with DVC remote %s", "repaired" if born else "created", self.root, self.remote_url)
        if self.git_remote:
            self._publish(None)

    def _ensure_git_remote(self) -> None:
        """Point ``origin`` at the shared history (a bare repository a path names is created) and adopt it when
        this repository has no commit yet: a second installation starts from the versions the first made."""
        if "://" not in self.git_remote and ":" not in self.git_remote.split("/", 1)[0]:
            bare = Path(self.git_remote)
            if not bare.exists() or (bare.is_dir() and not any(bare.iterdir())):
                bare.mkdir(parents=True, exist_ok=True)
                subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)], check=True,
                               capture_output=True)
            elif not ((bare / "HEAD").is_file() and (bare / "objects").is_dir() and not (bare / ".git").exists()):
                raise RuntimeError(f"NIGHTSHIFT_DATA_GIT_REMOTE names {bare}, which is neither empty nor a bare git "
                                   "repository: name an empty folder (it is made one) or a bare repository")
        if self._git_config("remote.origin.url") != self.git_remote:
            if self._git_config("remote.origin.url") is None:
                self._git("remote", "add", "origin", self.git_remote)
            else:
                self._git("remote", "set-url", "origin", self.git_remote)
        if not self._has_head() and self._fetch_origin():
            if subprocess.run(["git", "cat-file", "-e", "refs/remotes/origin/main:.dvc/config"], cwd=self.root,
                              capture_output=True).returncode != 0:
                raise RuntimeError("NIGHTSHIFT_DATA_GIT_REMOTE names a repository whose main is not a dataset history "
                                   "(it has no .dvc/config): name an empty repository, or the one the other "
                                   "installations share")
            self._git("reset", "--quiet", "--hard", "origin/main")

    def _fetch_origin(self) -> bool:
        """Fetch the shared history's main and version tags; return whether it has a main branch.

        A repository with versions of its own and no history in common with the shared one is refused, before
        any tag is fetched: the shared tags would take its tags' names. (Tags are never pruned: a local tag is
        either published or an unpublished version that _sync drops deliberately.)"""
        try:
            self._git("fetch", "--quiet", "origin", "+refs/heads/*:refs/remotes/origin/*")
        except RuntimeError as exc:
            raise RuntimeError(f"NIGHTSHIFT_DATA_GIT_REMOTE ({self.git_remote}) cannot be fetched: "
                               f"{str(exc)[-300:]}") from None
        has_main = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "refs/remotes/origin/main"],
                                  cwd=self.root, capture_output=True).returncode == 0
        if has_main and self._has_head() and self.versions() and subprocess.run(
                ["git", "merge-base", "HEAD", "refs/remotes/origin/main"], cwd=self.root,
                capture_output=True).returncode != 0:
            raise RuntimeError(
                f"the data repository {self.root} has dataset versions of its own and no history in common with "
                f"{self.git_remote}: point NIGHTSHIFT_DATA_GIT_REMOTE at an empty repository to publish them, or use "
                "a new NIGHTSHIFT_HOME to work from the shared versions")
        self._git("fetch", "--quiet", "origin", "+refs/tags/*:refs/tags/*")
        return has_main

    def _sync(self) -> None:
        """Bring this repository to the shared history's main (hold the lock): versions others made become known,
        and local commits the shared history does not hold (a lost race, a push never made) are published when
        they extend it and dropped with their tags when they do not (their bytes stay in the DVC remote)."""
        if not self.git_remote or not self._fetch_origin():
            return
        head, theirs = self._git("rev-parse", "HEAD"), self._git("rev-parse", "origin/main")
        if head == theirs:
            return
        if self._is_ancestor(head, theirs):
            self._git("reset", "--quiet", "--hard", "origin/main")
        elif self._is_ancestor(theirs, head):
            if not self._publish(None):
                self._sync()  # another installation pushed meanwhile (_publish raises when nobody did)
        else:
            for tag in self._git("tag", "--list", f"{self.name}-v*", "--no-merged", "origin/main").split():
                self._git("tag", "-d", tag)
            log.warning("this repository's main left the shared history; resetting it to the shared main")
            self._git("reset", "--quiet", "--hard", "origin/main")

    def _is_ancestor(self, older: str, newer: str) -> bool:
        return subprocess.run(["git", "merge-base", "--is-ancestor", older, newer], cwd=self.root,
                              capture_output=True).returncode == 0

    def _publish(self, tag: str | None) -> bool:
        """Push main (and ``tag``) to the shared history in one atomic push; return False when another
        installation pushed first (nothing was published), True when it holds them now or there is none."""
        if not self.git_remote:
            return True
        refs = ["HEAD:refs/heads/main"] + ([f"refs/tags/{tag}:refs/tags/{tag}"] if tag else [])
        # What this repository last fetched of the shared main: the commits it pushes build on it.
        known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "refs/remotes/origin/main"], cwd=self.root,
                               capture_output=True, text=True).stdout.strip()
        proc = subprocess.run(["git", "push", "--quiet", "--atomic", "--follow-tags", "origin", *refs], cwd=self.root,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return True
        # A lost race: the shared main moved since this repository fetched it. A refusal of a push that built on
        # the shared main as it is (a protected branch, a hook, no right to push) is no race: every retry would
        # be refused again.
        if self._remote_main() != known:
            return False
        raise RuntimeError(f"the shared dataset history ({self.git_remote}) refused the push of main: "
                           f"{proc.stderr.strip()[-300:]}")

    def _remote_main(self) -> str:
        proc = subprocess.run(["git", "ls-remote", "origin", "refs/heads/main"], cwd=self.root, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the shared dataset history ({self.git_remote}) cannot be read: "
                               f"{proc.stderr.strip()[-300:]}")
        return proc.stdout.split()[0] if proc.stdout.strip() else ""

    @staticmethod
    def _remove_stale_git_locks(git_dir: Path) -> None:
        """Remove the lock files a git killed mid-write leaves (index, HEAD, branch and tag refs, config): under
        the repository's lock no other git of ours runs here, and each would refuse every later version."""
        candidates = [git_dir / name for name in ("index.lock", "HEAD.lock", "config.lock", "packed-refs.lock",
                                                  "shallow.lock")]
        refs = git_dir / "refs"
        if refs.is_dir():
            candidates += sorted(refs.rglob("*.lock"))
        for stale in candidates:
            if stale.is_file():
                log.warning("removing a stale git lock %s", stale.relative_to(git_dir))
                stale.unlink()

    def _git_config(self, key: str) -> str | None:
        proc = subprocess.run(["git", "config", "--local", "--get", key], cwd=self.root, capture_output=True,
                              text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def _has_head(self) -> bool:
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=self.root,
                              capture_output=True)
        return proc.returncode == 0

    def versions(self) -> list[str]:
        """Return the version tags of this dataset, oldest first."""
        if not (self.root / ".git").is_dir():
            return []
        tags = self._git("tag", "--list", f"{self.name}-v*").split()
        return sorted(t for t in tags if re.fullmatch(rf"{re.escape(self.name)}-v\d+", t))

    def latest(self) -> DatasetVersion | None:
        """Return the newest version, or None before the first one."""
        tags = self.versions()
        return self.get(tags[-1]) if tags else None

    def get(self, tag: str) -> DatasetVersion:
        """Return the version a tag names; raise a clear error for an unknown tag."""
        known = self.versions()
        if tag not in known and self.git_remote:
            with self.locked():  # made by another installation since this one last looked
                self._ensure()
                self._sync()
            known = self.versions()
        if tag not in known:
            raise LookupError(
                f"dataset version {tag!r} does not exist in {self.root}; known: {', '.join(known[-5:]) or 'none'}"
            )
        rev = self._git("rev-list", "-n", "1", tag)
        dvc_file = yaml.safe_load(self._git("show", f"{rev}:{self.data_path}.dvc"))
        meta = json.loads(self._git("show", f"{rev}:{self.name}/meta.json"))
        out = dvc_file["outs"][0]
        return DatasetVersion(
            name=self.name, tag=tag, rev=rev, md5=out["md5"], path=self.data_path,
            documents=int(meta["documents"]), bytes=int(out["size"]), repo=str(self.root),
        )

    @contextmanager
    def locked(self):
        """Hold the repository's lock (one process at a time creates, changes or reads it); re-entrant."""
        if self._lock_depth:  # a second flock on a new descriptor in this process would wait for ever
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root.parent / f".{self.root.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def _tag_for(self, md5: str) -> str | None:
        for tag in reversed(self.versions()):
            if self.get(tag).md5 == md5:
                return tag
        return None

    def _head_md5(self) -> str | None:
        """Return the content hash the last commit records, or None when it records none."""
        proc = subprocess.run(["git", "show", f"HEAD:{self.data_path}.dvc"], cwd=self.root, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return None
        return (yaml.safe_load(proc.stdout) or {}).get("outs", [{}])[0].get("md5")

    def _next_tag(self) -> str:
        numbers = [int(t.rsplit("-v", 1)[1]) for t in self.versions()]
        return f"{self.name}-v{max(numbers, default=0) + 1:04d}"

    def commit(self, corpus_file: Path, meta: dict, companions: dict[str, Path] | None = None) -> DatasetVersion:
        """Version a corpus file; return the existing version instead when its bytes are already versioned.

        ``companions`` are small files committed to git beside the corpus in the same commit (its whylogs
        profile), so a version's tag fetches them exactly as they were made with it. With a shared history
        (``git_remote``) the version exists once the atomic push of its commit and tag succeeds; an installation
        that lost the race to another adopts the other's commits and tries again (the next number, or the
        other's version of the same bytes).
        """
        for _attempt in range(PUBLISH_ATTEMPTS):
            version = self._commit_once(corpus_file, meta, companions)
            if version is not None:
                return version
        raise RuntimeError(f"could not publish a dataset version to {self.git_remote} in {PUBLISH_ATTEMPTS} "
                           "attempts: other installations kept pushing first; retry the task")

    def _commit_once(self, corpus_file: Path, meta: dict, companions: dict[str, Path] | None) -> DatasetVersion | None:
        """Version a corpus once; return None when another installation published first (nothing was published)."""
        with self.locked():
            self._ensure()
            self._sync()
            md5 = content_md5(corpus_file)
            existing = self._tag_for(md5)
            if existing:
                log.info("corpus bytes unchanged (md5 %s): reusing %s", md5, existing)
                self.push()
                if not self._publish(None):
                    return None
                return self.get(existing)
            if self._head_md5() == md5:
                log.info("recovering an interrupted version: the last commit holds these bytes but has no tag")
                self.push()
            else:
                target = self.root / self.data_path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(corpus_file, target)
                (target.parent / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                for name in COMPANIONS:
                    (target.parent / name).unlink(missing_ok=True)
                for name, path in (companions or {}).items():
                    if name not in COMPANIONS:
                        raise ValueError(f"{name!r} is not a companion file a version may carry ({COMPANIONS})")
                    shutil.copyfile(path, target.parent / name)
                with self._repo() as repo:
                    repo.add([str(target)])
                fault_point("versioning.after_stage")
                self.push()
                fault_point("versioning.after_push")
                # A companion rewritten with the same size within one timestamp tick (and perhaps the inode freed a
                # moment before) can look unchanged to git's index: dropped from it, it is always hashed afresh.
                for name in COMPANIONS:
                    self._git("rm", "--cached", "--quiet", "--ignore-unmatch", f"{self.name}/{name}")
                self._git("add", "-A", self.name)
                self._git("commit", "--quiet", "-m", f"{meta.get('documents', '?')} documents (md5 {md5})")
                fault_point("versioning.after_commit")
            tag = self._next_tag()
            self._git("tag", "-a", tag, "-m", f"{self.name} version {tag}", "HEAD")
            fault_point("versioning.after_tag")
            if not self._publish(tag):
                log.info("another installation published %s first; adopting its history and trying again", tag)
                self._git("tag", "-d", tag)
                return None
            version = self.get(tag)
        log.info("created dataset version %s (%d documents, %d bytes)", version.ref, version.documents, version.bytes)
        return DatasetVersion(**{**version.to_dict(), "created": True})

    def read_companion(self, tag: str, name: str) -> bytes | None:
        """Return a companion file (e.g. profile.bin) exactly as version ``tag`` committed it, or None without one."""
        if name not in COMPANIONS:
            raise ValueError(f"{name!r} is not a companion file ({COMPANIONS})")
        rev = self._git("rev-list", "-n", "1", self.get(tag).tag)
        proc = subprocess.run(["git", "show", f"{rev}:{self.name}/{name}"], cwd=self.root, capture_output=True)
        return proc.stdout if proc.returncode == 0 else None

    def push(self) -> None:
        """Push the workspace's and every tagged version's bytes to the DVC remote (a no-op when it has them)."""
        with self._repo() as repo:
            repo.push(remote=REMOTE_NAME, all_tags=True)

    def fetch(self, version: DatasetVersion, dest: Path) -> Path:
        """Copy the exact bytes of a version to ``dest``, from the DVC cache or the remote, and verify them."""
        import dvc.api

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        with self.locked(), dvc.api.open(version.path, repo=str(self.root), rev=version.tag, mode="rb",
                                         remote=REMOTE_NAME) as src:
            with tmp.open("wb") as out:
                shutil.copyfileobj(src, out)
        got = content_md5(tmp)
        if got != version.md5:
            tmp.unlink()
            raise RuntimeError(f"{version.ref}: fetched bytes hash to {got}, expected {version.md5}")
        tmp.replace(dest)
        return dest

    def remote_has(self, version: DatasetVersion) -> bool:
        """Return True when the remote holds the bytes of a version."""
        if self.remote is not None:
            return (self.remote / "files" / "md5" / version.md5[:2] / version.md5[2:]).is_file()
        with self._repo() as repo:
            odb = repo.cloud.get_remote_odb(REMOTE_NAME)
            return odb.exists(version.md5)


def content_md5(path: Path) -> str:
    """Return the hash DVC records for a file."""
    from dvc_data.hashfile.hash import file_md5

    return file_md5(str(path))
