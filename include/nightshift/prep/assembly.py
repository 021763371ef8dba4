"""The end of a night's preparation: every shard's outcomes counted into the report, exact and near duplicates
removed over all shards, and the corpus written in id order with a line per dropped document beside it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.prep.recipe import PrepRecipe
from nightshift.prep.shards import shard_files, source_of

EXAMPLES = 5
"""Ids of dropped documents kept per reason in the report, never their text."""


@dataclass
class PrepReport:
    """Counts of one preparation run: per step, per reason, per PII type, per evaluation set."""

    documents_in: int = 0
    documents_out: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    """In order: {"step", "in", "out", "dropped": {reason: n}, "examples": {reason: [ids]}}."""
    pii: dict[str, int] = field(default_factory=dict)
    """Placeholders inserted per type, over the documents that were kept."""
    pii_documents: int = 0
    contamination: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per evaluation set: items, documents checked, documents contaminated, rate, action."""
    near_duplicates: dict[str, Any] = field(default_factory=dict)
    cached: int = 0
    characters: int = 0
    seconds: float = 0.0
    executor: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per source (the prefix of document ids): {"profile", "in", "out" (in the corpus), "dropped": {step:
    {reason: n}}}, the deduplication steps included; dropped.jsonl lists the ids."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Return the counts kept in a dataset version's metadata (no example ids)."""
        return {
            "documents_in": self.documents_in, "documents_out": self.documents_out,
            "dropped": {s["step"]: s["dropped"] for s in self.steps if s["dropped"]},
            "pii": self.pii, "contamination": {k: {"documents": v["contaminated"], "rate": v["rate"]}
                                               for k, v in self.contamination.items()},
            "near_duplicate_clusters": self.near_duplicates.get("clusters", 0),
        }


class _StepCounter:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen = 0
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def drop(self, reason: str, doc_id: str) -> None:
        self.dropped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < EXAMPLES:
            ids.append(doc_id)

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.dropped.values())
        return {"step": self.name, "in": self.seen, "out": self.seen - total,
                "dropped": dict(self.dropped.most_common()), "examples": self.examples}


def assemble(out: Path, tasks: int, corpus: Path, recipe: PrepRecipe, empty: list[str]) -> PrepReport:
    """Count outcomes, remove exact and near duplicates over all shards, and write the corpus in id order.

    Every dropped document gets a line in dropped.jsonl beside the corpus: id, step and reason.
    """
    from nightshift.prep.near_dup import find_near_duplicates

    report = PrepReport()
    counters = {"limits": _StepCounter("limits")}
    for steps in (recipe.steps, *recipe.profiles.values()):  # the default profile's order first
        for step in steps:
            counters.setdefault(step.name, _StepCounter(step.name))
    order = list(counters)
    orders = {name: ["limits", *(s.name for s in steps)] for name, steps in recipe.profiles.items()}
    by_source: dict[str, dict[str, Any]] = {}

    def count_source(doc_id: str, profile: str | None, step: str | None = None, reason: str | None = None) -> None:
        entry = by_source.setdefault(source_of(doc_id), {"profile": profile, "in": 0, "out": 0, "dropped": {}})
        if profile is not None:
            entry["in"] += 1
            entry["out"] += 1
        if step is not None:
            entry["out"] -= 1
            reasons = entry["dropped"].setdefault(step, {})
            reasons[reason] = reasons.get(reason, 0) + 1
    contaminated: Counter[str] = Counter()
    checked = 0
    dropped_path = corpus.with_name("dropped.jsonl")
    dropped_tmp = dropped_path.with_name(dropped_path.name + ".tmp")
    dropped_log = dropped_tmp.open("w", encoding="utf-8")

    def record(doc_id: str, step: str, reason: str) -> None:
        dropped_log.write(json.dumps({"id": doc_id, "step": step, "reason": reason}, ensure_ascii=False) + "\n")

    for doc_id in empty:
        report.documents_in += 1
        counters["limits"].seen += 1
        counters["limits"].drop("empty", doc_id)
        record(doc_id, "limits", "empty")
        count_source(doc_id, recipe.default_profile, "limits", "empty")
    for rank in range(tasks):
        with shard_files(out, rank)["outcomes"].open(encoding="utf-8") as fh:
            for line in fh:
                o = json.loads(line)
                report.documents_in += 1
                report.cached += bool(o["cached"])
                stop = o["step"]
                profile_order = orders[o.get("profile", recipe.default_profile)]
                count_source(o["id"], o.get("profile", recipe.default_profile))
                for name in profile_order:
                    counters[name].seen += 1
                    if name == stop:
                        counters[name].drop(o["reason"], o["id"])
                        record(o["id"], name, o["reason"])
                        count_source(o["id"], None, name, o["reason"])
                        break
                if "decontaminate" in profile_order and (
                        stop is None or profile_order.index(stop) >= profile_order.index("decontaminate")):
                    checked += 1
                for name in o["contaminated"]:
                    contaminated[name] += 1

    ids: list[str] = []
    hashes: list[str] = []
    for rank in range(tasks):
        with shard_files(out, rank)["index"].open(encoding="utf-8") as fh:
            for line in fh:
                entry = json.loads(line)
                ids.append(entry["id"])
                hashes.append(entry["sha256"])
    signatures = [np.load(shard_files(out, r)["signatures"]) for r in range(tasks)]
    matrix = np.concatenate(signatures) if signatures else np.empty((0, recipe.dedup.num_perm), np.uint32)

    drop: dict[int, str] = {}
    exact = _StepCounter("exact_dedup")
    exact.seen = len(ids)
    if recipe.dedup.exact:
        first: dict[str, int] = {}
        for i, digest in enumerate(hashes):
            if digest in first:
                drop[i] = "exact_duplicate"
                exact.drop("exact_duplicate", ids[i])
                count_source(ids[i], None, "exact_dedup", "exact_duplicate")
                record(ids[i], "exact_dedup", f"exact_duplicate:{ids[first[digest]]}")
            else:
                first[digest] = i
    near = _StepCounter("near_dedup")
    near.seen = len(ids) - len(drop)
    if recipe.dedup.near:
        remaining = np.array([i for i in range(len(ids)) if i not in drop], dtype=np.int64)

        def texts_of(rows: list[int]) -> list[str]:
            # Only documents of candidate pairs are read back, from the kept files, to verify them exactly.
            wanted = {int(remaining[r]) for r in rows}
            found: dict[int, str] = {}
            index = 0
            for rank in range(tasks):
                with shard_files(out, rank)["kept"].open(encoding="utf-8") as fh:
                    for line in fh:
                        if index in wanted:
                            found[index] = json.loads(line)["text"]
                        index += 1
            return [found[int(remaining[r])] for r in rows]

        clusters = find_near_duplicates(matrix[remaining], recipe.dedup.threshold, texts_of, recipe.dedup.ngram)
        for local, keep in clusters.duplicate_of.items():
            i = int(remaining[local])
            drop[i] = "near_duplicate"
            near.drop("near_duplicate", ids[i])
            count_source(ids[i], None, "near_dedup", "near_duplicate")
            record(ids[i], "near_dedup", f"near_duplicate:{ids[int(remaining[keep])]}")
        report.near_duplicates = {"clusters": clusters.clusters, "removed": len(clusters.duplicate_of),
                                  "candidate_pairs": clusters.candidate_pairs,
                                  "verified_pairs": clusters.verified_pairs, "threshold": recipe.dedup.threshold}
    report.steps = [counters[n].to_dict() for n in order] + [exact.to_dict(), near.to_dict()]
    report.sources = dict(sorted(by_source.items()))
    dropped_log.close()

    pii: Counter[str] = Counter()
    tmp = corpus.with_name(corpus.name + ".tmp")
    corpus.parent.mkdir(parents=True, exist_ok=True)
    index = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as dst:
        for rank in range(tasks):
            with shard_files(out, rank)["kept"].open(encoding="utf-8") as fh:
                for line in fh:
                    if index not in drop:
                        dst.write(line)
                        doc = json.loads(line)
                        report.documents_out += 1
                        report.characters += len(doc["text"])
                        found = doc["meta"].get("prep", {}).get("pii", {})
                        if found:
                            pii.update(found)
                            report.pii_documents += 1
                    index += 1
    dropped_tmp.replace(dropped_path)
    tmp.replace(corpus)
    report.pii = dict(sorted(pii.items()))
    decon = recipe.step("decontaminate")
    if decon is not None:
        from nightshift.prep.decontaminate import read_items

        for name in sorted(decon.sets):
            n = contaminated[name]
            report.contamination[name] = {
                "items": len(read_items(decon.set_path(name))), "checked": checked, "contaminated": n,
                "rate": round(n / checked, 6) if checked else 0.0, "action": decon.action,
            }
    return report
