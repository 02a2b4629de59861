"""Shared by the server and browser tests: the `up` + `serve` stack as subprocesses on free loopback ports, tiny
pipeline sizes, and a headless Chromium (Debian's, never a download) with step screenshots.
Used by tests/test_servers.py and tests/test_browser.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The deployments start from configs/smoke.yaml (a few seconds per stage on 2 CPU cores), which the tests then
# change in one place the way a person edits the UI form; on top of it: no eval pass, no system-metrics sampler.
SMOKE = ROOT / "configs" / "smoke.yaml"
UI_OVERRIDES = ["pretrain.eval_interval=0", "pipeline.system_metrics=false"]
REGISTERED_MODEL = "smoke-assistant"  # configs/smoke.yaml's pipeline.registered_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli() -> list[str]:
    """The installed console script when it has the server commands, else this module's own entry point."""
    script = Path(sys.executable).with_name("llm-pipeline")
    if script.exists():
        probe = subprocess.run([script, "up", "--help"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and "--prefect-port" in probe.stdout:
            return [str(script)]
    return [sys.executable, "-m", "flows.cli"]


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        HOME=str(home),
        PREFECT_HOME=str(home / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_ENABLE_TELEMETRY="false",
        DO_NOT_TRACK="1",
        # Served deployments pick up a new run within a second instead of ten.
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail}")


class Stack:
    """`up` + `serve` as subprocesses, as a person would start them."""

    def __init__(self, root: Path, name: str = "test", overrides: list[str] | None = None) -> None:
        self.root = root
        self.work = root / "servers-work"
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.env = base_env(root / "home")
        (root / "home").mkdir(parents=True, exist_ok=True)
        self.name = name
        self.overrides = overrides or []
        self.up_log, self.serve_log = root / "up.log", root / "serve.log"
        self.up_proc: subprocess.Popen | None = None
        self.serve_proc: subprocess.Popen | None = None
        self.client_env: dict[str, str] = {}
        self.extra_up_args: list[str] = []

    def start_up(self) -> None:
        argv = [*cli(), "up", "--work-dir", str(self.work), "--prefect-port", str(self.prefect_port),
                "--mlflow-port", str(self.mlflow_port), *self.extra_up_args]  # fmt: skip
        self.up_proc = subprocess.Popen(
            argv, env=self.env, cwd=self.root, stdout=open(self.up_log, "wb"), stderr=subprocess.STDOUT
        )
        wait_for(
            lambda: "Ctrl-C" in self.up_log.read_text(), 180, "llm-pipeline up", self.up_proc, self.up_log
        )
        for line in self.up_log.read_text().splitlines():
            line = line.strip()
            if line.startswith("export "):
                k, v = line.removeprefix("export ").split("=", 1)
                self.client_env[k] = v

    def start_serve(self) -> None:
        argv = [*cli(), "serve", "--work-dir", str(self.work), "--name", self.name, "--config", str(SMOKE)]
        for o in self.overrides:
            argv += ["--set", o]
        # The run's own outputs go to the stage work dir below root, through the pipeline config.
        env = {**self.env, **self.client_env}
        self.serve_proc = subprocess.Popen(
            argv, env=env, cwd=self.root, stdout=open(self.serve_log, "wb"), stderr=subprocess.STDOUT
        )

    def stop(self) -> dict[str, float]:
        """Ctrl-C to `serve`, then to `up` (the order a person stops them); returns seconds each took."""
        took = {}
        for name, p in (("serve", self.serve_proc), ("up", self.up_proc)):
            if p is None or p.poll() is not None:
                continue
            t0 = time.monotonic()
            p.send_signal(signal.SIGINT)
            try:
                # `up` gives each server 20 s to stop before SIGKILL; on a loaded 2-core CI box that can take most
                # of it, so wait for the whole of it rather than kill `up` midway and orphan its servers.
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            took[name] = time.monotonic() - t0
        self._kill_recorded_servers()
        return took

    def _kill_recorded_servers(self) -> None:
        """Servers a killed `up` left behind (their pids are in servers.json): gone, so later tests start clean."""
        state = self.work / "servers" / "servers.json"
        try:
            pids = json.loads(state.read_text()).get("pids", {})
        except (OSError, ValueError):
            return
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# Browser.

CHROMIUM = os.environ.get("LLM_PIPELINE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def screenshot_dir() -> Path:
    """Where step screenshots go: $LLM_PIPELINE_SCREENSHOTS, else screenshots/ in the repository (gitignored)."""
    d = Path(os.environ.get("LLM_PIPELINE_SCREENSHOTS", ROOT / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def chromium(viewport: tuple[int, int] = (1400, 1000)) -> Iterator[Any]:
    """A fresh headless Chromium profile (a new user-data dir each time), driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )  # fmt: skip
        try:
            yield ctx
        finally:
            ctx.close()


class Steps:
    """Numbered screenshots of each step; on failure, a screenshot of the page as it was, named for the step."""

    def __init__(self, page: Any, folder: Path, prefix: str) -> None:
        self.page, self.folder, self.prefix, self.n = page, folder, prefix, 0

    def shot(self, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.prefix}-{self.n:02d}-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.shot(f"FAILED-{name}")
            raise
        self.shot(name)
