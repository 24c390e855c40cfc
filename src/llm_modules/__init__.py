"""llm-modules: move knowledge from a large frozen language model into a small one."""

__version__ = "0.1.0"
