"""The one error type for bad input: it names the file and the field that is wrong."""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Raised before any work starts when an input file, field or option is wrong."""

    def __init__(self, path: str | Path | None, field: str | None, message: str):
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message
        where = ": ".join(part for part in (self.path, field) if part)
        super().__init__(f"{where}: {message}" if where else message)
