"""Coverage-guided fuzzing of one protocol core with atheris (libFuzzer for Python).

    .venv/bin/python bench/fuzz/fuzz.py TARGET [libFuzzer flags] [CORPUS_DIR ...] [CRASH_FILE ...]

TARGET is one of :data:`bench.fuzz.targets.TARGETS`. With corpus directories libFuzzer
fuzzes (new inputs are written to the first one); with files it replays just those,
which is how a ``crash-*`` file is reproduced. ``bench/fuzz/run.py`` runs every target
with its seeds and records the totals; use this script for one target or one crash.

Only ``gateway`` is instrumented for coverage: the fuzzer steers by the branches of
the code under test, not of the standard library.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("atheris is not installed: .venv/bin/pip install atheris (wheels for CPython 3.8-3.12 on x86-64 Linux)")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    name = sys.argv.pop(1)
    with atheris.instrument_imports(include=["gateway"]):
        from bench.fuzz import targets

        for lazy in ("gateway.sip.admission", "gateway.sip.digest", "gateway.trunks"):  # imported by targets later
            try:
                __import__(lazy)
            except ImportError:
                pass
    try:
        target = targets.TARGETS[name]
    except KeyError:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(targets.TARGETS)}")
    if name in targets.JSON_TARGETS:
        import random

        def mutator(data: bytes, max_size: int, seed: int) -> bytes:
            # Half of the mutations structural (any JSON type in any place), half libFuzzer's bytes.
            rng = random.Random(seed)
            if rng.random() < 0.5:
                mutated = targets.mutate_json(data, rng)
                if mutated is not None and len(mutated) <= max_size:
                    return mutated
            return atheris.Mutate(data, max_size)

        atheris.Setup(sys.argv, target, custom_mutator=mutator)
    else:
        atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
