"""ConfigurationError, apart from the HTTP exceptions: policies raise it, and both flavours share it."""

from __future__ import annotations

from typing import Any


class ConfigurationError(ValueError):
    """A policy or policy file is invalid; the message names the field and value."""

    def __init__(self, field: str, value: Any, reason: str, *, where: str | None = None) -> None:
        message = f"{field}: {reason}" if value is None else f"{field}: {reason} (got {value!r})"
        super().__init__(message if where is None else f"{where}: {message}")
        self.field = field
        self.value = value
        self.reason = reason
        #: The file, and the line where it can be told, of a policy file's error.
        self.where = where
