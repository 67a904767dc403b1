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
