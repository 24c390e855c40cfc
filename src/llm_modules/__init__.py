"""llm-modules: move knowledge from a large frozen language model into a small one."""

from .model.configuration import ComposeOptions, LLMModulesConfig
from .errors import LLMModulesError
from .model.modeling import LLMModulesForCausalLM

__all__ = ["ComposeOptions", "LLMModulesConfig", "LLMModulesError", "LLMModulesForCausalLM"]
__version__ = "0.1.0"
