"""The one error type for bad input: it names the file and the field that is wrong."""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Raised before any work starts when an input file, field or option is wrong."""

    def __init__(self, path: str | Path | None, field: str | None = None, message: str | None = None):
        if field is None and message is None and isinstance(path, str):
            # Rebuilt from one formatted text: a DataLoader worker re-raises its error in the main process as
            # `type(text)`, with the worker's traceback in front; keep the error's own line.
            path, message = None, path.rsplit(f"{type(self).__name__}: ", 1)[-1].strip()
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message or ""
        where = ": ".join(part for part in (self.path, field) if part)
        super().__init__(f"{where}: {self.message}" if where else self.message)
