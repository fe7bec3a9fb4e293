"""``python -m deal_train.estimate_memory``: kept for the documented command; the tool lives in ``deal_train.tools.estimate_memory``."""

import sys

from .tools.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
