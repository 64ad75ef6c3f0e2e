"""The console scripts' entry points: Ctrl-C is one line and exit code 130 from the first instant.

A program's own module imports torch and the model libraries (a second or more); those imports
run here, inside the guard, and the program's ``main`` (``common.run_main``) guards the rest. The
package's ``__init__`` imports nothing until a name is used, so nothing heavy runs before this.
"""

from __future__ import annotations

import importlib
import sys


def _launch(program: str) -> int:
    try:
        main = importlib.import_module(f"test_time_registers.scripts.{program}").main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
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
