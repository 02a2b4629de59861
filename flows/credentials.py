"""Credentials of servers exposed beyond loopback: Prefect's basic-auth string and MLflow's admin user, kept in
owner-readable files in the servers' state folder so they survive restarts."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (optionally `export`ed, quoted) of a shell env file; {} when it does not exist."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export ") :]
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v.strip("'\"")
    return out


def write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only, atomically.

    Not llm.files.atomic_file: that one makes its files world-readable (outputs are shared), these hold secrets.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_credentials(state_dir: Path) -> dict[str, str]:
    """Server-side secrets for exposed servers: taken from the environment when set, else generated once.

    They are stable across restarts because MLflow creates its admin user only on the first start.
    """
    path = state_dir / "credentials.env"
    saved = load_env_file(path)
    prefect_auth = os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or saved.get(
        "PREFECT_SERVER_API_AUTH_STRING"
    )
    mlflow_user = (
        os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or saved.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    )
    mlflow_pw = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or saved.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    prefect_auth = prefect_auth or f"admin:{secrets.token_urlsafe(18)}"
    mlflow_pw = mlflow_pw or secrets.token_urlsafe(18)
    # Signs MLflow's CSRF tokens; must stay the same across restarts and workers.
    flask_key = (
        os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or saved.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or secrets.token_urlsafe(32)
    )
    creds = {
        "PREFECT_SERVER_API_AUTH_STRING": prefect_auth,
        "MLFLOW_AUTH_ADMIN_USERNAME": mlflow_user,
        "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_pw,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_key,
    }
    if creds != saved:
        write_private(path, "".join(f"{k}={v}\n" for k, v in creds.items()))
    return creds


def client_credentials(creds: dict[str, str]) -> dict[str, str]:
    """What a client (CLI, worker, notebook) exports to talk to the authenticated servers."""
    return {
        "PREFECT_API_AUTH_STRING": creds["PREFECT_SERVER_API_AUTH_STRING"],
        "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_AUTH_ADMIN_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_AUTH_ADMIN_PASSWORD"],
    }


def mlflow_auth_env(creds: dict[str, str], state_dir: Path, work_dir: Path) -> dict[str, str]:
    """Environment of an MLflow server running its basic-auth app; writes the app's config file."""
    ini = state_dir / "mlflow_auth.ini"
    write_private(
        ini,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{work_dir / 'mlflow_auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": creds["MLFLOW_AUTH_ADMIN_USERNAME"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds["MLFLOW_AUTH_ADMIN_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
    }
