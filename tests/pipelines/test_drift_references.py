"""Which versions a new corpus is compared with: the previous one with other bytes, and the champion's data."""

from nightshift.monitoring.drift import DriftPolicy
from nightshift.pipelines.ingest import drift_references
from nightshift.settings import Settings
from nightshift.stores import dataset_repository
from nightshift.versioning.dvc_store import content_md5


def test_previous_and_champion_references(tmp_path):
    settings = Settings(home=tmp_path)
    repo = dataset_repository(settings)
    corpus = tmp_path / "corpus.jsonl"
    tags = []
    for text in ("a", "b", "c"):
        corpus.write_text(f'{{"id": "s/{text}", "text": "{text}"}}\n')
        tags.append(repo.commit(corpus, {"documents": 1}).tag)
    policy = DriftPolicy.load()
    new = tmp_path / "new.jsonl"
    new.write_text('{"id": "s/d", "text": "d"}\n')
    assert drift_references(settings, policy, content_md5(new), tags[0]) == [("previous", tags[2]),
                                                                              ("champion", tags[0])]
    # The night's bytes are already the newest version: compare with the one before, not with itself.
    assert drift_references(settings, policy, content_md5(corpus), None) == [("previous", tags[1])]
    # A champion trained on these very bytes, or on a tag this repository does not hold, is no reference.
    assert drift_references(settings, policy, content_md5(corpus), tags[2]) == [("previous", tags[1])]
    assert drift_references(settings, policy, content_md5(new), "corpus-v0099") == [("previous", tags[2])]


def test_no_versions_no_references(tmp_path):
    assert drift_references(Settings(home=tmp_path), DriftPolicy.load(), "0" * 32, "corpus-v0001") == []
