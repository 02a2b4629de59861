"""`llm-pipeline up` and `serve` started on a fresh work dir while two other processes open the same (embedded)
MLflow store, then stopped by SIGTERM sent to both at the same moment: every store opener succeeds, and both servers
exit within 10 s with one line each and no traceback (Prefect's client would otherwise print the websocket's
"received 1012 (service restart)" and go on retrying). Run: .venv/bin/pytest tests/test_servers_stop.py"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser_utils import Stack, wait_for

ROOT = Path(__file__).resolve().parents[1]

_OPEN_STORE = """
import sys, time
from flows.tracking import setup_tracking
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
tr = setup_tracking("llm-pipeline", sys.argv[1])
tr.client.create_run(tr.experiment_id)
print("ok", tr.experiment_id)
"""


@pytest.mark.timeout(600)
# settle 0: the signal right after serve printed its addresses, before Prefect's runner has started
@pytest.mark.parametrize("settle_s", [0.0, 3.0])
def test_up_and_serve_stop_within_10s_on_sigterm_sent_to_both(tmp_path, settle_s):
    s = Stack(tmp_path)
    # two pipelines' worth of store openers, timed to meet `up` preparing the same fresh store
    start = str(time.time() + 4)
    openers = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(s.work), start], cwd=ROOT,
                                env={k: v for k, v in s.env.items() if k != "MLFLOW_TRACKING_URI"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        s.start_up()
        for p in openers:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0 and out.startswith("ok"), err[-3000:]
            assert "Traceback" not in err, err[-3000:]
        s.start_serve()
        wait_for(lambda: "Start runs from the Prefect UI" in s.serve_log.read_text(), 240, "serve", s.serve_proc,
                 s.serve_log)
        time.sleep(settle_s)  # after 3 s serve's runner polls and holds its websocket to the server
        before = {name: log.read_text() for name, log in (("up", s.up_log), ("serve", s.serve_log))}
        procs = {"up": s.up_proc, "serve": s.serve_proc}
        t0 = time.monotonic()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        took = {}
        for name, p in procs.items():
            p.wait(timeout=30)
            took[name] = time.monotonic() - t0
        print(f"stopped after SIGTERM: {took}")
        for name, log in (("up", s.up_log), ("serve", s.serve_log)):
            text = log.read_text()
            after = text[len(before[name]):]
            assert "Traceback" not in text, f"{name}:\n{text[-4000:]}"
            stop_lines = [ln for ln in after.splitlines() if "SIGTERM: stopping" in ln]
            assert len(stop_lines) == 1, f"{name}:\n{after}"
            assert took[name] < 10, f"{name} took {took[name]:.1f} s to stop:\n{after}"
        assert procs["up"].returncode == 0 and procs["serve"].returncode == 0
        assert "Servers stopped." in s.up_log.read_text()
    finally:
        for p in openers:
            if p.poll() is None:
                p.kill()
        s.stop()
