"""Errors a user can act on. The CLI prints their message and exits without a stack trace."""


class LLMModulesError(ValueError):
    """A user mistake (bad path, bad option, bad data): the message says what to do."""
