"""Turning a service's refusal into a command's error.

Services say what was wrong in the domain's words and, when one setting was at fault,
name it in ``ApplicationError.extra["field"]``; a command prefixes the option that set
it (``--val-fraction``), so the person knows which flag to change.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.core.management.base import CommandError

from supportbot.errors import ApplicationError


def command_error(
    exc: ApplicationError, *, options: Mapping[str, str] | None = None, returncode: int = 1
) -> CommandError:
    """``exc`` as a CommandError; ``options`` maps a setting to its flag where it is not ``--<setting>``."""
    name = exc.extra.get("field")
    if not name:
        return CommandError(exc.message, returncode=returncode)
    flag = (options or {}).get(name, "--" + name.replace("_", "-"))
    return CommandError(f"{flag}: {exc.message}", returncode=returncode)
