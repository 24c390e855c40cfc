"""llm-modules: move knowledge from a large frozen language model into a small one."""

from .model.configuration import LLMModulesConfig
from .errors import LLMModulesError
from .model.modeling import LLMModulesForCausalLM

__all__ = ["LLMModulesConfig", "LLMModulesError", "LLMModulesForCausalLM"]
__version__ = "0.1.0"
