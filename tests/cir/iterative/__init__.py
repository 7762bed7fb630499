"""Tests of cir.iterative.

Under pytest's default (prepend) import mode `tests/` goes on sys.path, and `tests/cir/__init__.py` makes `tests/cir/`
a package named `cir`, so this folder is found as `cir.iterative` before the real package. Adding the real package's
folder to this package's search path makes `import cir.iterative.<module>` load the real modules (test modules here
have names the real package does not use).
"""
from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[3] / "cir" / "iterative"))  # noqa: F821 (package __path__)
