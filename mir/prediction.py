"""Entry point of the `prediction` mode of the MIR loop (see mir.loop for what it reads and writes).

    python -m mir.prediction --config configs/mir/shapes.yaml [--key value ...]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mir import loop


def main(argv: Sequence[str] | None = None) -> Path:
    return loop.main(argv, mode="prediction")


if __name__ == "__main__":
    main()
