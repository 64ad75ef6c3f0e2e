"""The console scripts' entry points: Ctrl-C is one line and exit code 130 from the first instant.

A program's own module imports torch and the model libraries (a second or more); those imports
run here, under a SIGINT handler that ends the process at once (nothing is written before
``main`` runs), and the program's ``main`` (``common.run_main``) guards the rest, cleaning up
what it wrote. The package's ``__init__`` imports nothing until a name is used, so nothing heavy
runs before this.
"""

from __future__ import annotations

import importlib
import os
import signal


def _interrupted_while_importing(signum, frame) -> None:
    # A KeyboardInterrupt raised here could land inside the import machinery's own callbacks, which
    # swallow it; nothing has been written yet, so the process ends at once instead.
    os.write(2, b"error: interrupted\n")
    os._exit(130)


def _launch(program: str) -> int:
    previous = signal.signal(signal.SIGINT, _interrupted_while_importing)
    try:
        main = importlib.import_module(f"test_time_registers.scripts.{program}").main
    finally:
        signal.signal(signal.SIGINT, previous)   # from here on, run_main turns Ctrl-C into one line and 130
    return main()


def find_register_neurons() -> int:
    return _launch("find_register_neurons")


def benchmark() -> int:
    return _launch("benchmark")


def visualize() -> int:
    return _launch("visualize")


def evaluate() -> int:
    return _launch("evaluate")


def train_registers() -> int:
    return _launch("train_registers")


def export() -> int:
    return _launch("export")
