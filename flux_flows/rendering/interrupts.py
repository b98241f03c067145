"""Ctrl-C during a batch: the first stops new work, the second ends it at once.

Kept apart from the rendering loop so that the command line can choose how a second Ctrl-C
ends the process without importing Prefect (`--help` must answer at once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

# Set by the command line: a second Ctrl-C ends the process at once with this code. Raising
# KeyboardInterrupt instead (what a library must do) would still wait at exit for the threads
# whose answers are in flight, for as long as the API takes.
ABORT_EXIT_CODE: int | None = None
ABORTED = (
    "aborted: the images in flight are abandoned (a real API may bill them) and no manifest is "
    "written; what was stored stays stored, and running the same command again does the rest\n"
)


@contextlib.contextmanager
def first_ctrl_c_stops() -> Iterator[threading.Event]:
    """While images are submitted from the main thread, the first Ctrl-C only sets an event the
    loop reads (a KeyboardInterrupt could land inside a Prefect API call that swallows it); the
    second raises KeyboardInterrupt as usual, or under the CLI ends the process at once."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if pressed.is_set():
            if ABORT_EXIT_CODE is not None:
                os.write(2, ABORTED.encode())
                os._exit(ABORT_EXIT_CODE)
            raise KeyboardInterrupt
        pressed.set()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
