"""Entry point of the `image-query` mode of the MIR loop (see mir.loop for what it reads and writes).

    python -m mir.image_query --config configs/mir/shapes.yaml [--key value ...]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mir import loop


def main(argv: Sequence[str] | None = None) -> Path:
    return loop.main(argv, mode="image-query")


if __name__ == "__main__":
    main()
