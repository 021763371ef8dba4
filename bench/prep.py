"""The whole preparation recipe (include/configs/prep.yaml) on 100,000 generated documents (about 300 MB).

    .venv/bin/python bench/prep.py [--docs 100000] [--workers 0]

First, on Debian's HTML manuals of git and PostgreSQL (tests/manuals.py fetches them) and a set of planted junk
pages, prints the share of pages each shipped profile (docs, web) keeps and its throughput. Then prints
documents/s, MB/s and the peak resident memory of the whole process tree (the datatrove workers
included), for a first night and for an unchanged second night that reuses cached outcomes; the second is
printed as a share of the first, measured in the same run. Goals: peak RSS under 1.5 GB, the first night at
least 2 MB/s on two cores.

The documents are English prose from a seeded generator (1-5 KB each, 2.5 KB on average: 255 MB for
100,000), with planted problems in the proportions a crawled help centre shows: 5% near-duplicates, 2% exact
copies, 2% other languages, 3% boilerplate or repetition, 3% carrying personal data or credentials.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nightshift.prep.curate import curate  # noqa: E402
from nightshift.prep.recipe import DEFAULT_RECIPE, PrepRecipe  # noqa: E402
from planted import pii_items, sentence, variant  # noqa: E402

GERMAN = ("Das Observatorium liegt auf dem Kamm, und die Galerie ist von Mittwoch bis Sonntag geöffnet. Die Karten "
          "kosten zwölf Euro für Erwachsene, und Kinder zahlen die Hälfte. ")


def generate(path: Path, docs: int, seed: int = 0) -> int:
    """Write raw.jsonl with ``docs`` documents; return its size in bytes."""
    rng = random.Random(seed)
    pool = [sentence(rng) for _ in range(30_000)]
    recent: list[str] = []
    with path.open("w", encoding="utf-8") as fh:
        for i in range(docs):
            roll = rng.random()
            if roll < 0.05 and recent:
                text = variant(rng, rng.choice(recent), rng.uniform(0.8, 0.98), above=True)[0]
            elif roll < 0.07 and recent:
                text = rng.choice(recent)
            elif roll < 0.09:
                text = GERMAN * rng.randint(4, 12)
            elif roll < 0.12:
                text = "\n".join([rng.choice(pool)] * rng.randint(10, 30))
            else:
                paragraphs = [" ".join(rng.choices(pool, k=rng.randint(3, 7))) for _ in range(rng.randint(5, 10))]
                if roll < 0.15:
                    kind, item = rng.choice(pii_items(rng))
                    paragraphs.insert(1, item)
                text = "\n\n".join(paragraphs)
                if len(recent) < 500:
                    recent.append(text)
                else:
                    recent[rng.randrange(500)] = text
            fh.write(json.dumps({"id": f"doc/{i:07d}", "source": f"doc/{i:07d}.txt", "format": "text",
                                 "content": text, "meta": {}}) + "\n")
    return path.stat().st_size


class PeakMemory:
    """Samples the resident memory of this process and all its children every 50 ms; keeps the peak sum."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def night(raw: Path, work: Path, recipe: PrepRecipe, cache: Path, label: str, size: int) -> float:
    with PeakMemory() as memory:
        started = time.perf_counter()
        report = curate(raw, work / f"{label}.jsonl", work / label, recipe, cache)
        seconds = time.perf_counter() - started
    print(f"{label:<10} {report.documents_in / seconds:8.0f} docs/s  {size / 1e6 / seconds:6.2f} MB/s  "
          f"{seconds:7.1f} s  peak RSS {memory.peak / 2**30:.2f} GB  kept {report.documents_out}  "
          f"cached {report.cached}  tasks {report.executor['tasks']} on {report.executor['workers']} workers")
    return seconds


def real_manuals(recipe: PrepRecipe) -> None:
    """Print, per shipped profile, the share of each real manual's pages kept and of planted junk pages kept,
    and the throughput of extraction plus steps on one core."""
    from manuals import ManualUnavailable, html_pages, junk_pages, manual
    from nightshift.prep.curator import DocumentCurator

    try:
        roots = {name: manual(name) for name in ("git", "postgresql")}
    except ManualUnavailable as exc:
        print(f"real manuals: skipped ({exc})")
        return
    sets = {name: [(f"{name}/{p.name}", "html", p.read_text(encoding="utf-8", errors="replace"))
                   for p in html_pages(root)] for name, root in roots.items()}
    sets["junk"] = [(f"junk/{name}", "html", html) for name, html in junk_pages().items()]
    for profile in ("docs", "web"):
        curator = DocumentCurator(recipe.profile(profile))
        for name, docs in sets.items():
            size = sum(len(d[2].encode()) for d in docs)
            started = time.perf_counter()
            outcomes = [o for i in range(0, len(docs), 64) for o in curator.process_batch(docs[i:i + 64])]
            seconds = time.perf_counter() - started
            kept = sum(o.step is None for o in outcomes)
            print(f"{profile:5} {name:11} kept {kept:5} of {len(docs):5} pages ({kept / len(docs):6.1%})  "
                  f"{size / 1e6 / seconds:5.2f} MB/s of HTML on one core, extraction included")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core, as the shipped recipe")
    parser.add_argument("--manuals-only", action="store_true", help="only the real manuals' shares")
    args = parser.parse_args()
    data = json.loads(json.dumps(PrepRecipe.load(DEFAULT_RECIPE).to_dict()))
    data["executor"]["workers"] = args.workers
    recipe = PrepRecipe.from_dict(data)
    real_manuals(recipe)
    if args.manuals_only:
        return
    work = Path(tempfile.mkdtemp(prefix="nightshift-prep-bench-"))
    try:
        started = time.perf_counter()
        size = generate(work / "raw.jsonl", args.docs)
        print(f"{args.docs} documents, {size / 1e6:.0f} MB generated in {time.perf_counter() - started:.0f} s")
        first = night(work / "raw.jsonl", work, recipe, work / "cache.sqlite", "first", size)
        second = night(work / "raw.jsonl", work, recipe, work / "cache.sqlite", "unchanged", size)
        print(f"unchanged night / first night: {second / first:.0%} of the time")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
