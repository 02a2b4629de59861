"""Credentials of servers exposed beyond loopback: Prefect's basic-auth string and MLflow's admin user, kept in
owner-readable files in the servers' state folder so they survive restarts.

The servers read every secret from such a file (a Prefect profile, MLflow's auth config, a libpq password file),
not from their environment or command line, where `ps e` and `ps` would show it. MLflow's basic-auth app gives
users other than the admin no permission on anything until they are granted one (`default_permission`).
"""

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


# A user the admin has not granted anything sees nothing (MLflow's default would let every user read every
# experiment and model); docker/mlflow-auth.ini says the same.
MLFLOW_DEFAULT_PERMISSION = "NO_PERMISSIONS"


def mlflow_auth_ini(creds: dict[str, str], auth_db_uri: str) -> str:
    """MLflow's basic-auth config, the admin's name and password included (the file is owner-readable only)."""
    for k in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        if any(c in creds[k] for c in "\n\r%"):
            raise ValueError(f"{k} must not contain a line break or '%' (it goes into an ini file)")
    return (
        f"[mlflow]\ndefault_permission = {MLFLOW_DEFAULT_PERMISSION}\n"
        f"database_uri = {auth_db_uri}\n"
        f"admin_username = {creds['MLFLOW_AUTH_ADMIN_USERNAME']}\n"
        f"admin_password = {creds['MLFLOW_AUTH_ADMIN_PASSWORD']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def mlflow_auth_env(creds: dict[str, str], state_dir: Path, work_dir: Path) -> dict[str, str]:
    """Environment of an MLflow server running its basic-auth app; writes the app's config file, which holds the
    admin password (MLflow reads it from there when MLFLOW_AUTH_ADMIN_PASSWORD is not set)."""
    ini = state_dir / "mlflow_auth.ini"
    write_private(ini, mlflow_auth_ini(creds, f"sqlite:///{work_dir / 'mlflow_auth.db'}"))
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        # Flask reads its key from the environment only; it signs CSRF tokens, it is no password
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
    }


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prefect_auth_env(creds: dict[str, str], state_dir: Path) -> dict[str, str]:
    """Environment of a Prefect server with basic auth: its auth string lives in a profile of its own (an
    owner-readable file), which the server reads at start."""
    profiles = state_dir / "prefect-profiles.toml"
    write_private(profiles, 'active = "llm-pipeline"\n\n[profiles.llm-pipeline]\n'
                  f"PREFECT_SERVER_API_AUTH_STRING = {_toml_string(creds['PREFECT_SERVER_API_AUTH_STRING'])}\n")
    return {"PREFECT_PROFILES_PATH": str(profiles)}


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def server_store_uri(uri: str, state_dir: Path) -> tuple[str, dict[str, str]]:
    """The backend store URI to put on MLflow's command line, and the environment it needs: a PostgreSQL password
    (in the URI, or PGPASSWORD) moves into an owner-readable libpq password file (PGPASSFILE), so neither the
    server's command line (`ps`) nor its environment (`ps e`) shows it."""
    from sqlalchemy.engine import URL, make_url

    if not uri.startswith("postgresql"):
        return uri, {}
    url = make_url(uri)
    password = str(url.password) if url.password else os.environ.get("PGPASSWORD")  # make_url decodes it
    if not password:
        return uri, {}  # libpq finds it on its own (~/.pgpass, PGPASSFILE) or needs none
    pgpass = state_dir / "mlflow-store.pgpass"
    write_private(pgpass, f"*:*:*:{_pgpass_field(url.username or '*')}:{_pgpass_field(password)}\n")
    bare = URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)
    return bare.render_as_string(hide_password=False), {"PGPASSFILE": str(pgpass)}
