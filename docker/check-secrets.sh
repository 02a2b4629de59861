#!/bin/sh
# Refuses a secrets file that is not ready for the team set-up: a key missing or empty, a value still the
# placeholder of docker/.env.example, too short, or with characters that would break the URLs and config files the
# services build from it. Runs before every service (the `secrets-check` service of compose.yaml); run it by hand
# too:   sh docker/check-secrets.sh docker/.env
#
# Values: letters, digits and . _ ~ - only (URL-safe); generate one with
#   python3 -c "import secrets; print(secrets.token_urlsafe(24))"
# PREFECT_AUTH_STRING is USER:PASSWORD, each part like that.
# Only shell built-ins touch the values, so no process's command line shows them.
set -u

file=${1:-/run/secrets/llm-pipeline}
if [ ! -r "$file" ]; then
    echo "check-secrets: cannot read the secrets file $file (copy docker/.env.example to docker/.env, set every" \
         "value, and make it readable by uid 1000, the user every service runs as)" >&2
    exit 1
fi

problems=0
say() {
    echo "check-secrets: $1" >&2
    problems=$((problems + 1))
}

value_of() { # KEY -> the value of its first KEY=VALUE line in $file (empty when missing)
    found=""
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in
            "$1="*) found=${line#*=}; break ;;
        esac
    done < "$file"
    printf '%s' "$found"
}

check() { # KEY MIN_LENGTH [user:password]
    key=$1 min=$2 kind=${3:-plain}
    v=$(value_of "$key")
    if [ -z "$v" ]; then
        say "$key is missing or empty in $file"
        return
    fi
    case $v in
        *change-me* | *changeme* | *CHANGE-ME* | *CHANGEME*)
            say "$key still holds the placeholder of docker/.env.example; set a real secret"
            return ;;
    esac
    if [ "$kind" = "user:password" ]; then
        case $v in
            *:*) user=${v%%:*} pw=${v#*:} ;;
            *) say "$key must be USER:PASSWORD"; return ;;
        esac
        case $user in "" | *[!A-Za-z0-9._~-]*) say "$key: the user name must be letters, digits, . _ ~ -"; return ;; esac
        v=$pw
    fi
    case $v in
        *[!A-Za-z0-9._~-]*)
            say "$key holds characters other than letters, digits and . _ ~ - (they would break URLs and config files)"
            return ;;
    esac
    if [ "${#v}" -lt "$min" ]; then
        say "$key is shorter than $min characters; use e.g. python3 -c \"import secrets; print(secrets.token_urlsafe(24))\""
    fi
}

check POSTGRES_PASSWORD 16
check PREFECT_AUTH_STRING 16 user:password
check MLFLOW_ADMIN_PASSWORD 16
check MLFLOW_SECRET_KEY 24
check MINIO_ROOT_PASSWORD 16

if [ "$problems" -gt 0 ]; then
    echo "check-secrets: $file is not ready ($problems problem(s)); no service was started" >&2
    exit 1
fi
case $(ls -ln "$file" 2>/dev/null | cut -c8-10) in
    *r*) echo "check-secrets: warning: other users of this machine can read $file (chmod 600 it)" >&2 ;;
esac
echo "check-secrets: $file is ready"
