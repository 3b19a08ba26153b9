"""The one exception services raise when a business rule refuses an action.

Views turn it into a 4xx response, consumers into an ``error`` frame, commands
into ``CommandError`` and admin actions into an error message.
"""

from __future__ import annotations

from typing import Any


class ApplicationError(Exception):
    def __init__(self, message: str, *, code: str = "invalid", extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.extra = extra or {}

    def __str__(self) -> str:
        return self.message
