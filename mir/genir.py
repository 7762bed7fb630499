"""Entry point of the `genir` mode of the MIR loop (see mir.loop for what it reads and writes).

    python -m mir.genir --config configs/mir/shapes.yaml [--key value ...]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mir import loop


def main(argv: Sequence[str] | None = None) -> Path:
    return loop.main(argv, mode="genir")


if __name__ == "__main__":
    main()
