import pytest

from gateway.config import ConfigError, Settings, load_settings


def test_defaults_match_the_documented_conventions():
    s = load_settings(environ={})
    assert (s.sip_host, s.sip_port, s.sip_udp, s.sip_tcp) == ("0.0.0.0", 5060, True, True)
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.silence_ms == 500 and s.max_turn_s == 20.0
    assert s.asr_model == "tiny.en"


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "earshot.yaml"
    path.write_text("sip:\n  port: 5070\nredis_url: redis://10.0.0.1:6379/1\nsilence_ms: 400\n")
    s = load_settings(path, environ={"EARSHOT_SIP_PORT": "5080", "EARSHOT_SIP_TCP": "false"})
    assert s.sip_port == 5080
    assert s.sip_tcp is False
    assert s.redis_url == "redis://10.0.0.1:6379/1"
    assert s.silence_ms == 400


def test_unknown_file_key_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sip_port: 5060\n\nsilence_msec: 300\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line 3: unknown setting 'silence_msec'"):
        load_settings(path, environ={})


def test_wrong_type_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sip:\n  port: five\n")
    with pytest.raises(ConfigError, match=r"line 2: sip_port: expected an integer, got 'five'"):
        load_settings(path, environ={})


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sip_port: 5060\nredis_url: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_settings(path, environ={})


def test_environment_errors_name_the_variable():
    with pytest.raises(ConfigError, match="EARSHOT_SIP_PORT: sip_port: expected an integer"):
        load_settings(environ={"EARSHOT_SIP_PORT": "x"})
    with pytest.raises(ConfigError, match="EARSHOT_NOPE: unknown setting 'nope'"):
        load_settings(environ={"EARSHOT_NOPE": "1"})


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="speculative_ms"):
        load_settings(environ={"EARSHOT_SPECULATIVE_MS": "600"})
    with pytest.raises(ConfigError, match="sip_port"):
        load_settings(environ={"EARSHOT_SIP_PORT": "70000"})
    with pytest.raises(ConfigError, match="rtp_port_min"):
        load_settings(environ={"EARSHOT_RTP_PORT_MIN": "20000", "EARSHOT_RTP_PORT_MAX": "10000"})


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_example_config_in_deploy_is_valid():
    s = load_settings("deploy/earshot.example.yaml", environ={})
    assert isinstance(s, Settings)
    assert (s.asr_context_tokens, s.asr_context_audio_s) == (32, 10.0)


def test_context_settings_are_checked():
    with pytest.raises(ConfigError, match="asr_context_audio_s"):
        load_settings(environ={"EARSHOT_ASR_CONTEXT_AUDIO_S": "25"})
    with pytest.raises(ConfigError, match="asr_context_tokens"):
        load_settings(environ={"EARSHOT_ASR_CONTEXT_TOKENS": "300"})


# -- a file that is not UTF-8 -------------------------------------------------------------------

def test_a_file_that_is_not_utf8_is_an_error_naming_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"sip_port: 5060\n# caf\xe9\nsip_user_agent: Earshot\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml line 2: not UTF-8 text \(byte 0xe9 at column 6\)"):
        load_settings(path, environ={})


def test_earshot_config_reports_a_file_that_is_not_utf8_without_a_traceback(tmp_path, capsys):
    from gateway.cli import main

    path = tmp_path / "bad.yaml"
    path.write_bytes(b'sip_user_agent: "E\xff"\n')
    with pytest.raises(SystemExit) as caught:
        main(["config", "-c", str(path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"earshot: configuration error: {path} line 1: not UTF-8 text (byte 0xff at column 19); "
                           "save the configuration file as UTF-8")


def test_an_environment_value_that_is_not_utf8_is_an_error_naming_the_variable():
    raw = b"Earshot\xff".decode("utf-8", "surrogateescape")  # how os.environ holds such bytes
    with pytest.raises(ConfigError, match="^environment variable EARSHOT_SIP_USER_AGENT: not UTF-8 text"):
        load_settings(environ={"EARSHOT_SIP_USER_AGENT": raw})


# -- secrets are masked in `earshot config` and in the start-up log ----------------------------

SECRETS = {
    "redis_url": ("redis://default:redis-pw-1@127.0.0.1:6379/0", "redis://default:***@127.0.0.1:6379/0"),
    "database_url": ("postgresql+psycopg://earshot:db-pw-2@db.example/earshot",
                     "postgresql+psycopg://earshot:***@db.example/earshot"),
    "asr_openai_url": ("https://asr:url-pw-3@asr.example/v1?api_key=url-key-4&model=x",
                       "https://asr:***@asr.example/v1?api_key=***&model=x"),
    "web_secret_key": ("web-secret-key-5-long-enough", "***"),
    "asr_openai_api_key": ("sk-openai-key-6", "***"),
    "twilio_auth_token": ("twilio-token-7", "***"),
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_earshot_config_masks_each_secret(name, capsys):
    import json

    from gateway.cli import main

    value, shown = SECRETS[name]
    env = {f"EARSHOT_{name.upper()}": value}
    with pytest.MonkeyPatch.context() as mp:
        for key, v in env.items():
            mp.setenv(key, v)
        assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)[name] == shown
    for secret in ("redis-pw-1", "db-pw-2", "url-pw-3", "url-key-4", "web-secret-key-5", "sk-openai-key-6",
                   "twilio-token-7"):
        assert secret not in out


def test_earshot_config_masks_trunk_passwords(tmp_path, capsys):
    import json

    from gateway.cli import main

    path = tmp_path / "earshot.yaml"
    path.write_text("trunks:\n  - name: pbx\n    networks: [192.0.2.0/24]\n"
                    "    auth: {username: pbx, password: trunk-pw-8}\n")
    assert main(["config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trunk-pw-8" not in out
    assert json.loads(out)["trunks"][0]["auth"]["password"] == "***"


def test_empty_secrets_stay_visible_as_empty():
    from gateway.config import describe, masked

    shown = describe(load_settings(environ={}))
    assert shown["web_secret_key"] == "" and shown["redis_url"] == "redis://127.0.0.1:6379/0"
    assert shown["database_url"] == "sqlite:///earshot.db"
    assert masked({"x": [{"sip_tls_key_password": "p"}]}) == {"x": [{"sip_tls_key_password": "***"}]}


async def test_the_start_up_log_masks_the_redis_password(caplog):
    """A real gateway started with a Redis URL that carries a password (Redis accepts any
    password for its passwordless "default" user) logs where it listens without it."""
    import dataclasses
    import logging

    from gateway.app import Gateway
    from gateway.asr.media_only import MediaOnlyTranscriber
    from gateway.dialplan import Dialplan

    settings = load_settings(environ={
        "EARSHOT_SIP_HOST": "127.0.0.1", "EARSHOT_SIP_TCP": "false", "EARSHOT_HTTP_PORT": "0",
        "EARSHOT_RTP_HOST": "127.0.0.1", "EARSHOT_PERSIST": "false", "EARSHOT_WEB_ENABLED": "false",
        "EARSHOT_API_ENABLED": "false",
        "EARSHOT_REDIS_URL": "redis://default:start-up-pw-9@127.0.0.1:6379/0",
        "EARSHOT_STREAM_PREFIX": "earshot-test-mask",
    })
    gateway = Gateway(dataclasses.replace(settings, sip_port=0), transcriber=MediaOnlyTranscriber(),
                      dialplan=Dialplan.accept_all())
    with caplog.at_level(logging.INFO):
        await gateway.start()
        try:
            assert await gateway.publisher.flush(5)
        finally:
            await gateway.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "redis://default:***@127.0.0.1:6379/0" in text
    assert "start-up-pw-9" not in text
