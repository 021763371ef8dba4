"""Real technical documentation nobody here wrote: HTML manuals packaged in Debian, fetched once per machine.

``manual("git")`` returns the folder of git's HTML manual (package git-doc), ``manual("postgresql")`` that of
PostgreSQL's (the newest postgresql-doc-NN the package lists offer), downloading the package with
``apt-get download`` and unpacking it with ``dpkg-deb -x`` into a cache outside the repository the first time
(a few MB, a second or two). Where Debian's tools or its mirror are not reachable the tests that need a manual
skip and say why.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("NIGHTSHIFT_MANUALS_CACHE", Path.home() / ".cache" / "nightshift" / "manuals"))
# name -> (package or a pattern of package names, the HTML folder inside the package)
MANUALS = {
    "git": ("git-doc", "usr/share/doc/git-doc"),
    "postgresql": (r"postgresql-doc-\d+", "usr/share/doc/{package}/html"),
}


class ManualUnavailable(Exception):
    """The manual could not be fetched here; the message says why."""


def manual(name: str) -> Path:
    """Return the HTML folder of a manual, fetching its Debian package the first time."""
    pattern, inside = MANUALS[name]
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test processes started together fetch once
        done = CACHE / name / ".complete"
        if done.is_file():
            return CACHE / name / done.read_text().strip()
        package = _package(pattern)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            _run(["apt-get", "download", "-qq", package], cwd=tmp)
            deb = next(Path(tmp).glob("*.deb"))
            unpacked = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(deb), str(unpacked)], cwd=tmp)
            shutil.rmtree(CACHE / name, ignore_errors=True)
            unpacked.rename(CACHE / name)
        folder = inside.format(package=package)
        if not (CACHE / name / folder).is_dir():
            raise ManualUnavailable(f"{package} has no folder {folder}")
        done.write_text(folder)
        return CACHE / name / folder


def _package(pattern: str) -> str:
    if not re.search(r"[\\\[*+]", pattern):
        return pattern
    found = _run(["apt-cache", "pkgnames", pattern.split("-")[0]], cwd=None)
    names = sorted((n for n in found.split() if re.fullmatch(pattern, n)),
                   key=lambda n: int(re.findall(r"\d+", n)[-1]))
    if not names:
        raise ManualUnavailable(f"no package matching {pattern} in the package lists (apt-get update?)")
    return names[-1]


def _run(cmd: list[str], cwd: str | None) -> str:
    if shutil.which(cmd[0]) is None:
        raise ManualUnavailable(f"{cmd[0]} is not installed (a Debian-based machine is needed)")
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise ManualUnavailable(f"{' '.join(cmd)} took over 300 s") from None
    if proc.returncode != 0:
        raise ManualUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def html_pages(folder: Path) -> list[Path]:
    """Return the manual's HTML pages (links to other pages of it included once), sorted."""
    return sorted({p.resolve() for p in folder.rglob("*.html") if p.resolve().is_relative_to(folder.resolve())})


def junk_pages(seed: int = 0, each: int = 10) -> dict[str, str]:
    """Return planted pages a docs site must not train on (path -> HTML): boilerplate, spam, gibberish and
    filler, ``each`` of every kind, linked from ``index.html``."""
    import random

    rng = random.Random(seed)
    words = ("cheap", "best", "deal", "casino", "bonus", "free", "click", "win", "offer", "now", "pills", "loan")
    pages: dict[str, str] = {}

    def html(title: str, body: str) -> str:
        return (f"<!doctype html><html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> "
                f"<a href='/about.html'>About</a></nav><main>{body}</main><footer>© Example Ltd</footer></body></html>")

    for i in range(each):
        pages[f"boilerplate-{i}.html"] = html("Cookies", (
            "<p>We use cookies to improve your experience. Accept all cookies? Manage preferences.</p>"
            "<p>Subscribe to our newsletter. Follow us. Share this page. Privacy policy. Terms of use.</p>"))
        spam = " ".join(rng.choice(words) for _ in range(400))
        pages[f"spam-{i}.html"] = html("Best deals", f"<p>{spam}</p><p>{spam}</p>")
        gibberish = " ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(3, 9)))
                             for _ in range(300))
        pages[f"gibberish-{i}.html"] = html("x", f"<p>{gibberish}.</p>")
        filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. " * 30
        pages[f"filler-{i}.html"] = html("Lorem", f"<p>{filler}</p>")
    links = "".join(f"<li><a href='{name}'>{name}</a></li>" for name in sorted(pages))
    pages["index.html"] = html("Index", f"<ul>{links}</ul>")
    return pages
