"""``python -m deal_train`` and ``accelerate launch -m deal_train``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
