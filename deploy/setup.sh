#!/usr/bin/env bash
# Sets up Earshot on a Debian machine: system packages, Redis, and a virtualenv in .venv/.
# Idempotent: run it again at any time. Usage: bash deploy/setup.sh [--no-apt]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System packages: Python venv support, Redis (the event bus), and the tools the tests
# and benchmarks use as independent peers (sipp, baresip) and to make test speech (sox, flite);
# chromium for the dashboard's browser tests (Playwright drives it; it never downloads a browser).
PKGS=(python3-venv python3-dev redis-server redis-tools sox flite sip-tester baresip chromium
      asterisk-core-sounds-en-wav asterisk-core-sounds-en)
if [ "${1:-}" != "--no-apt" ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
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

# Test peer: faster-whisper-server, an OpenAI-compatible /v1/audio/transcriptions server nobody
# here wrote (tests/peers.py starts it for the asr_backend=openai tests), in its own venv so that
# its pins never touch .venv.
[ -x .venv-peers/bin/python ] || "$PY" -m venv .venv-peers
.venv-peers/bin/python -m pip install -q 'faster-whisper-server==0.0.3' 'faster-whisper==1.2.1'
HF_HUB_OFFLINE=1 .venv-peers/bin/faster-whisper-server --help >/dev/null \
  || { echo "setup: faster-whisper-server missing from .venv-peers" >&2; exit 1; }
echo "setup: done (.venv/bin/earshot is ready)"
