"""Reloading the dialplan while calls are up: on SIGHUP and when the file changes.

A reload builds a whole new :class:`~gateway.dialplan.Dialplan` and swaps it in for
new calls only: a call keeps the frozen :class:`~gateway.dialplan.Route` it was
answered with, so nothing active is touched. A file that does not load (or that
the gateway refuses: a model it does not serve, a silence threshold its turn
settings cannot take) is refused with its error logged, and the plan in force stays.

Changes are noticed by polling the file's identity (device, inode, size, mtime in
ns) every ``dialplan_poll_s``: no inotify dependency, and an editor's
write-to-temp-then-rename is seen as well as an in-place write. Each identity is
tried once: a half-written file that fails is retried when the next write changes
it again, not every poll. :class:`DialplanSource` does no scheduling itself: the
gateway calls :meth:`DialplanSource.poll` from its own loop, and tests call it
directly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .dialplan import Dialplan, DialplanError, load_dialplan

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def stamp_of(path: str) -> Stamp | None:
    """The file's identity now; None when it cannot be read (being replaced, or removed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    version: str  # the version in force after the attempt
    error: str = ""  # why the new file was refused (file:line: message)
    changed: bool = False  # a new version is in force


class DialplanSource:
    """The dialplan in force, the file it came from, and its reloads.

    ``validate`` is the gateway's own check of a loaded plan (models served, turn
    settings); it raises :class:`DialplanError`. ``path`` None: a plan given in code,
    never reloaded.
    """

    def __init__(self, plan: Dialplan, path: str | None = None,
                 validate: Callable[[Dialplan], None] = lambda plan: None,
                 on_change: Callable[[ReloadResult], None] | None = None) -> None:
        self.plan = plan
        self.path = path
        self.validate = validate
        self.on_change = on_change
        self.stamp: Stamp | None = stamp_of(path) if path else None
        self.reloads = 0  # new plans taken after the first
        self.refused = 0
        self.last_error = ""

    @classmethod
    def from_file(cls, path: str | Path, validate: Callable[[Dialplan], None] = lambda plan: None,
                  on_change: Callable[[ReloadResult], None] | None = None) -> "DialplanSource":
        """The first load: its errors are raised (a gateway must not start on a broken plan)."""
        path = str(path)
        stamp = stamp_of(path)
        plan = load_dialplan(path)
        validate(plan)
        source = cls(plan, path, validate, on_change)
        source.stamp = stamp
        return source

    @property
    def version(self) -> str:
        return self.plan.version

    def changed(self) -> bool:
        return self.path is not None and stamp_of(self.path) != self.stamp

    def poll(self) -> ReloadResult | None:
        """Reload if the file changed since it was last tried; None when it did not."""
        if self.path is None or not self.changed():
            return None
        stamp = stamp_of(self.path)
        if stamp is None:  # gone for now (a rename in progress): keep the plan, look again later
            return None
        return self.reload("file changed")

    def reload(self, reason: str = "reload") -> ReloadResult:
        """Load the file again; the new plan is in force only if it loads and validates."""
        if self.path is None:
            return ReloadResult(ok=False, version=self.version, error="the dialplan was not loaded from a file")
        self.stamp = stamp_of(self.path)
        try:
            plan = load_dialplan(self.path)
            self.validate(plan)
        except DialplanError as exc:
            self.refused += 1
            self.last_error = exc.located
            log.error("dialplan %s (%s) refused, version %s stays in force: %s", self.path, reason,
                      self.version, exc.located)
            result = ReloadResult(ok=False, version=self.version, error=exc.located)
        else:
            changed = plan.version != self.version
            previous, self.plan = self.plan.version, plan
            self.reloads += 1
            self.last_error = ""
            log.info("dialplan %s (%s): version %s in force (was %s): %s", self.path, reason, plan.version,
                     previous, plan.summary())
            result = ReloadResult(ok=True, version=plan.version, changed=changed)
        if self.on_change is not None:
            self.on_change(result)
        return result
