"""The fact world: a synthetic benchmark that proves or refutes knowledge transfer (issue 4)."""

from .world import Fact, FactWorld, build_world, check_splits, source_documents, trace_record

__all__ = ["Fact", "FactWorld", "build_world", "check_splits", "source_documents", "trace_record"]
