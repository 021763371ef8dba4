"""Run a Supervisor over a process tree that tries to escape it; used by tests/test_supervisor.py.

Services: one that starts a child which double-forks a detached grandchild (its own session), one that
ignores SIGTERM, and one that dies once and must be restarted. Every process carries NS_TEST_MARKER.
"""

import sys
from pathlib import Path

from nightshift.supervisor import Service, Supervisor

state = Path(sys.argv[1])
py = sys.executable

ESCAPE = """
import os, time, subprocess, sys
subprocess.Popen([sys.executable, "-c", '''
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(3600)
    os._exit(0)
time.sleep(3600)
'''])
time.sleep(3600)
"""
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
FLAKY = f"""
import time
from pathlib import Path
starts = Path({str(state / 'starts')!r})
starts.write_text(starts.read_text() + 'x' if starts.exists() else 'x')
if len(starts.read_text()) == 1:
    raise SystemExit(3)
time.sleep(3600)
"""

services = [Service("escape", [py, "-c", ESCAPE]), Service("stubborn", [py, "-c", STUBBORN]),
            Service("flaky", [py, "-c", FLAKY])]
sys.exit(Supervisor(services, grace_seconds=3).run(poll_seconds=0.2))
