import os
import time

from nightshift.pipelines.housekeeping import prune_work_dirs


def test_old_run_folders_go_and_the_current_and_recent_ones_stay(tmp_path):
    old, recent, current = (tmp_path / n for n in ("manual__old", "manual__recent", "manual__now"))
    for folder in (old, recent, current):
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "corpus.jsonl").write_text("x")
    ten_days_ago = time.time() - 10 * 86400
    for path in (old, old / "data", old / "data" / "corpus.jsonl", current, current / "data",
                 current / "data" / "corpus.jsonl"):
        os.utime(path, (ten_days_ago, ten_days_ago))
    removed = prune_work_dirs(tmp_path, retention_days=7, keep=current)
    assert removed == [old]
    assert recent.is_dir() and current.is_dir()
