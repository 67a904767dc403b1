"""End to end with baresip, a second independent SIP user agent (besides PJSIP and sipp):
it calls `earshot run` over UDP on loopback, offering only PCMA (A-law), plays a fixture
recording from a WAV file and hangs up; the test reads the transcript back from Redis.

baresip runs headless: no UI module, a config and accounts file written into the test's
temporary directory, the `aufile` module as its microphone, commands given with `-e`
and `-t` making it quit (and so send BYE) after the recording has been played.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import by_call, pcm_wav, read_events, start_gateway, wait_for_calls_ended
from tests.fixtures_data import get_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("baresip") is None,
                                 reason="baresip not installed (deploy/setup.sh installs it)")]

MODULES = Path("/usr/lib/baresip/modules")  # Debian's baresip-core
WER_BOUND = 0.25  # as tests/e2e/test_calls.py: tiny.en through the whole path


@pytest.fixture(scope="module")
def gateway():
    gw = start_gateway()
    yield gw
    rc = gw.stop()
    assert rc == 0, gw.log()


def baresip_config(directory: Path, wav: Path, user: str) -> Path:
    config = directory / "baresip"
    config.mkdir()
    (config / "config").write_text(f"""\
poll_method epoll
sip_listen 127.0.0.1:0
sip_transports udp
net_interface 127.0.0.1
dns_server 127.0.0.1:53
audio_source aufile,{wav}
audio_player aufile,{directory / 'heard.wav'}
audio_alert aufile,{directory / 'alert.wav'}
ausrc_srate 8000
auplay_srate 8000
ausrc_channels 1
auplay_channels 1
audio_path {directory}
rtp_ports 40000-49998
module_path {MODULES}
module g711.so
module aufile.so
module_app account.so
module_app menu.so
""")
    # no registration (regint=0): the gateway is a registrar-less callee
    (config / "accounts").write_text(f"<sip:{user}@127.0.0.1>;regint=0;audio_codecs=PCMA\n")
    (config / "contacts").write_text("")
    return config


def test_baresip_call_is_transcribed(gateway, tmp_path):
    entry = get_entry("caller_04_outbound_call.wav")
    wav = pcm_wav(entry.file, tmp_path)
    user = f"baresip-{uuid.uuid4().hex[:8]}"
    config = baresip_config(tmp_path, wav, user)
    seconds = entry.duration_ms // 1000 + 3  # the whole recording, then a little silence, then BYE
    done = subprocess.run(["baresip", "-4", "-f", str(config), "-t", str(seconds),
                           "-e", f"/dial sip:support@127.0.0.1:{gateway.sip_port}"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 30)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    assert "Call established" in done.stdout, log

    mine = [e for e in read_events(gateway.events_stream) if e["from"] == f"sip:{user}@127.0.0.1"]
    assert mine, f"the gateway published nothing for baresip's call:\n{log}\n{gateway.log()}"
    sip_call_id = mine[0]["sip_call_id"]
    events = by_call(wait_for_calls_ended(gateway.events_stream, {sip_call_id}, timeout=30))[sip_call_id]
    types = [e["type"] for e in events]
    assert types[0] == "call.started" and types[-1] == "call.ended", types
    started, ended = events[0], events[-1]
    assert started["codec"] == "PCMA" and started["transport"] == "udp"
    assert started["remote_media"].startswith("127.0.0.1:")
    assert ended["reason"] == "bye", ended  # baresip hung up
    assert ended["rtp"]["packets"] > entry.duration_ms / 20 * 0.9, ended["rtp"]
    assert ended["rtp"]["malformed"] == 0, ended["rtp"]
    finals = [e for e in events if e["type"] == "turn.final"]
    assert len(finals) >= len(entry.turns) - 1, [f["text"] for f in finals]
    text = " ".join(f["text"] for f in finals)
    assert word_error_rate(entry.text, text) <= WER_BOUND, (entry.text, text)
