import numpy as np
import pytest

from gateway.media.resample import RESAMPLERS, measure, upsample_8k_to_16k

METHODS = sorted(RESAMPLERS)


def tone(freq: float, seconds: float = 1.0, amplitude: float = 0.5, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def spectrum_db(y: np.ndarray, rate: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    window = np.hanning(len(y))
    magnitude = np.abs(np.fft.rfft(y * window))
    return np.fft.rfftfreq(len(y), 1 / rate), 20 * np.log10(magnitude / magnitude.max() + 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_1khz_tone_keeps_frequency_and_amplitude(method):
    x = tone(1000)
    y = upsample_8k_to_16k(x, method)
    assert y.dtype == np.float32
    assert len(y) == 2 * len(x)
    freqs, db = spectrum_db(y)
    assert abs(freqs[np.argmax(db)] - 1000) <= 2
    middle = y[800:-800]  # away from the filter's edge transients
    rms = float(np.sqrt(np.mean(middle.astype(np.float64) ** 2)))
    expected = 0.5 / np.sqrt(2)
    tolerance = 0.01 if method != "ratecv" else 0.08  # linear interpolation droops ~5% at 1 kHz
    assert abs(rms - expected) / expected < tolerance


def test_polyphase_suppresses_the_image_above_4khz():
    # Zero-stuffing a 1 kHz tone creates an image at 16/2 - 1 = 7 kHz; the low-pass must remove it.
    freqs, db = spectrum_db(upsample_8k_to_16k(tone(1000), "polyphase"))
    assert db[(freqs > 6900) & (freqs < 7100)].max() < -70
    # The telephone band passes: a 3.3 kHz tone keeps its level.
    y = upsample_8k_to_16k(tone(3300), "polyphase")[800:-800]
    assert abs(np.sqrt(np.mean(y.astype(np.float64) ** 2)) / (0.5 / np.sqrt(2)) - 1) < 0.01


def test_polyphase_is_delay_compensated():
    # Band-limited input: even output samples must reproduce the input samples.
    x = tone(440)
    y = upsample_8k_to_16k(x, "polyphase")
    error = np.abs(y[0::2][100:-100] - x[100:-100] / 32768.0)
    assert error.max() < 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [0, 1, 7, 160, 8001])
def test_output_is_exactly_twice_as_long(method, n):
    x = np.random.default_rng(n).integers(-20000, 20000, n).astype(np.int16)
    assert len(upsample_8k_to_16k(x, method)) == 2 * n


@pytest.mark.parametrize("method", METHODS)
def test_bytes_and_arrays_give_the_same_result(method):
    x = tone(700, 0.1)
    np.testing.assert_array_equal(upsample_8k_to_16k(x.tobytes(), method), upsample_8k_to_16k(x, method))


@pytest.mark.parametrize("method", METHODS)
def test_unity_gain_at_dc(method):
    y = upsample_8k_to_16k(np.full(1000, 16384, dtype=np.int16), method)
    np.testing.assert_allclose(y[200:-200], 0.5, rtol=1e-4)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown resampling method 'cubic'"):
        upsample_8k_to_16k(b"\x00\x00", "cubic")
    with pytest.raises(ValueError, match="even length"):
        upsample_8k_to_16k(b"\x00\x00\x00")
    with pytest.raises(TypeError, match="int16"):
        upsample_8k_to_16k(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        upsample_8k_to_16k(np.zeros((2, 10), dtype=np.int16))


def test_measure_reports_every_method():
    costs = measure(seconds=0.5, repeats=1)
    assert set(costs) == set(RESAMPLERS)
    assert all(cost >= 0 for cost in costs.values())


@pytest.mark.parametrize("method", ["polyphase", "ratecv"])
def test_pipeline_incremental_resampling_equals_whole_buffer(method):
    """The leg pipeline resamples a growing turn incrementally; the result must equal
    resampling the whole turn at once."""
    from gateway.events import CallInfo, EventFactory
    from gateway.media.turn import TurnConfig
    from gateway.pipeline import LegPipeline

    leg = LegPipeline(key="k", leg="caller", events=EventFactory(CallInfo("c", "s", "a", "b", 0.0)),
                      publish=lambda e: None, transcriber=None, turn_config=TurnConfig(), language=None,
                      resampler=method)
    rng = np.random.default_rng(7)
    audio = (rng.standard_normal(8000 * 6) * 4000).astype(np.int16)
    for n in (3000, 8000, 8100, 20000, 48000):  # partials growing, then the final
        got = leg._upsampled(1, 1234, audio[:n])
        want = upsample_8k_to_16k(audio[:n], method=method)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6)
    # another turn starts afresh
    got = leg._upsampled(2, 60000, audio[:500])
    np.testing.assert_allclose(got, upsample_8k_to_16k(audio[:500], method=method), atol=1e-6)
