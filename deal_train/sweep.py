"""``python -m deal_train.sweep``: kept for the documented command; the tool lives in ``deal_train.tools.sweep``."""

import sys

from .tools.sweep import main

if __name__ == "__main__":
    sys.exit(main())
