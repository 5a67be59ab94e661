"""Testing a handler as calhook runs it: sample events in either shape, and a harness that
delivers them to one handler with calhook's own semantics (:mod:`calhook.testing.harness`).
The pytest plugin (:mod:`calhook.testing.plugin`) offers both as fixtures."""

from calhook.testing.events import Sample, SampleError, calenso_event, sample_types
from calhook.testing.harness import FAST, Harness, HarnessError, PairResult, Result

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
