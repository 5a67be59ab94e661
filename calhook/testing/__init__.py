"""Testing a handler as calhook runs it: sample events in either shape, and a harness that
delivers them to one handler with calhook's own semantics (:mod:`calhook.testing.harness`).
The pytest plugin (:mod:`calhook.testing.plugin`) offers both as fixtures.

The names below are imported on first use: pytest loads the plugin, and with it this package,
in every run where calhook is installed, and most runs never use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from calhook.testing.events import Sample, SampleError, calenso_event, sample_types
    from calhook.testing.harness import FAST, Harness, HarnessError, PairResult, Result

_WHERE = {
    "Sample": "events",
    "SampleError": "events",
    "calenso_event": "events",
    "sample_types": "events",
    "FAST": "harness",
    "Harness": "harness",
    "HarnessError": "harness",
    "PairResult": "harness",
    "Result": "harness",
}

__all__ = [
    "FAST",
    "Harness",
    "HarnessError",
    "PairResult",
    "Result",
    "Sample",
    "SampleError",
    "calenso_event",
    "sample_types",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"calhook.testing.{_WHERE[name]}"), name)
