"""One way to open the small CPU ONNX models that run per leg (Silero VAD, Smart Turn).

Both run batched from one worker thread, so a session gets a fixed number of intra-op
threads, one inter-op thread and sequential execution: the cores stay for Whisper and
the event loop, and a model's cost does not depend on what else the machine runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cpu_session(path: Path, *, threads: int) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` on the CPU; ValueError if it does not load."""
    import onnxruntime  # deferred: importing the package must stay cheap

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ValueError(f"{path} is not a loadable ONNX model: {exc}") from exc
