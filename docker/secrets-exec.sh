#!/bin/sh
# Starts a service of compose.yaml with its secrets taken from the secrets file (a compose secret, mounted at
# /run/secrets/llm-pipeline), handed over in owner-only files in a private folder, never in an environment variable
# or on a command line (so neither `ps` nor `docker inspect` shows them):
#
#   secrets-exec.sh postgres COMMAND...        POSTGRES_PASSWORD_FILE (the postgres image reads it at first start)
#   secrets-exec.sh prefect-server COMMAND...  a Prefect profile: the database password, the API's auth string
#   secrets-exec.sh mlflow COMMAND...          MLflow's auth config with the admin password, a libpq password file
#   secrets-exec.sh minio COMMAND...           MINIO_ROOT_USER_FILE / MINIO_ROOT_PASSWORD_FILE (MinIO reads them)
#   secrets-exec.sh client COMMAND...          a Prefect profile (auth string), ~/.mlflow/credentials (admin),
#                                              ~/.aws/credentials (MinIO, the artifact root's object store)
#
# Only shell built-ins touch the values. Flask's CSRF signing key (MLFLOW_SECRET_KEY) is the one value MLflow reads
# from its environment only; it is set inside the container, not in compose.yaml.
set -eu
umask 077

SECRETS=${LLM_PIPELINE_SECRETS_FILE:-/run/secrets/llm-pipeline}
role=$1
shift

value_of() { # KEY -> its value in $SECRETS; fails when missing (docker/check-secrets.sh ran before, though)
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in
            "$1="*) printf '%s' "${line#*=}"; return 0 ;;
        esac
    done < "$SECRETS"
    echo "secrets-exec: $1 is missing from $SECRETS" >&2
    return 1
}

private=$(mktemp -d "${TMPDIR:-/tmp}/llm-pipeline-secrets.XXXXXX")
MINIO_USER=llm-pipeline  # MinIO's root user (not a secret; its password is)

case $role in
    postgres)
        pw=$(value_of POSTGRES_PASSWORD)
        printf '%s' "$pw" > "$private/postgres_password"
        export POSTGRES_PASSWORD_FILE="$private/postgres_password"
        ;;
    prefect-server)
        pw=$(value_of POSTGRES_PASSWORD)
        auth=$(value_of PREFECT_AUTH_STRING)
        printf 'active = "secrets"\n\n[profiles.secrets]\nPREFECT_SERVER_DATABASE_PASSWORD = "%s"\nPREFECT_SERVER_API_AUTH_STRING = "%s"\n' \
            "$pw" "$auth" > "$private/profiles.toml"
        export PREFECT_PROFILES_PATH="$private/profiles.toml"
        ;;
    mlflow)
        pw=$(value_of POSTGRES_PASSWORD)
        admin=$(value_of MLFLOW_ADMIN_PASSWORD)
        key=$(value_of MLFLOW_SECRET_KEY)
        # the committed template (no password in it) plus the admin's credentials
        { cat "${MLFLOW_AUTH_TEMPLATE:-/etc/mlflow/auth.ini}"; printf 'admin_username = admin\nadmin_password = %s\n' "$admin"; } \
            > "$private/auth.ini"
        printf '%s:%s:%s:%s:%s\n' "${PGHOST:-postgres}" "${PGPORT:-5432}" mlflow llm "$pw" > "$private/pgpass"
        export MLFLOW_AUTH_CONFIG_PATH="$private/auth.ini" PGPASSFILE="$private/pgpass"
        export MLFLOW_FLASK_SERVER_SECRET_KEY="$key"
        ;;
    minio)
        pw=$(value_of MINIO_ROOT_PASSWORD)
        printf '%s' "$MINIO_USER" > "$private/minio_user"
        printf '%s' "$pw" > "$private/minio_password"
        export MINIO_ROOT_USER_FILE="$private/minio_user" MINIO_ROOT_PASSWORD_FILE="$private/minio_password"
        ;;
    client)
        auth=$(value_of PREFECT_AUTH_STRING)
        admin=$(value_of MLFLOW_ADMIN_PASSWORD)
        minio=$(value_of MINIO_ROOT_PASSWORD)
        mkdir -p "$HOME/.aws"
        printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$MINIO_USER" "$minio" \
            > "$HOME/.aws/credentials"
        printf 'active = "secrets"\n\n[profiles.secrets]\nPREFECT_API_AUTH_STRING = "%s"\n' "$auth" \
            > "$private/profiles.toml"
        export PREFECT_PROFILES_PATH="$private/profiles.toml"
        mkdir -p "$HOME/.mlflow"
        printf '[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = %s\n' "$admin" \
            > "$HOME/.mlflow/credentials"
        ;;
    *)
        echo "secrets-exec: unknown role '$role' (postgres, prefect-server, mlflow, minio, client)" >&2
        exit 2
        ;;
esac

exec "$@"
