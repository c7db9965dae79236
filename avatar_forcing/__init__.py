"""Avatar Forcing real-time avatar server: command line and shared helpers."""

import sys
from pathlib import Path

__version__ = "0.1.0"

# The checkout's kernels/ folder installs as avatar_forcing.kernels, but with the checkout's root on sys.path
# (`python -m avatar_forcing.cli` run from it puts it first) it also shadows the PyPI package `kernels`, which
# transformers >= 5.25 requires and imports: loading wav2vec2 then fails with "cannot import name ... from
# 'kernels'". Nothing of ours is imported through the root (the install maps every folder), so drop it.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "kernels" / "__init__.py").is_file():
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
