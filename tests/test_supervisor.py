"""The supervisor restarts a dead service and, on SIGTERM, leaves no process behind, escaped or stubborn."""

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from helpers import marked, wait_for

PROBE = Path(__file__).with_name("supervise_probe.py")


def test_sigterm_stops_every_process_including_escaped_and_stubborn_ones(tmp_path):
    marker = uuid.uuid4().hex
    env = {**os.environ, "NS_TEST_MARKER": marker}
    probe = subprocess.Popen([sys.executable, str(PROBE), str(tmp_path)], env=env)
    try:
        # the supervisor; escape, its child and the detached great-grandchild; stubborn; flaky
        wait_for(lambda: len(marked(marker)) >= 6, 60, "the process tree to start")
        wait_for(lambda: (tmp_path / "starts").is_file() and (tmp_path / "starts").read_text() == "xx", 30,
                 "the flaky service to be restarted")
        probe.send_signal(signal.SIGTERM)
        assert probe.wait(timeout=30) == 0
        assert marked(marker) == []
    finally:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)
