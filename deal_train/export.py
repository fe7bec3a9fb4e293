"""``python -m deal_train.export``: kept for the documented command; the tool lives in ``deal_train.tools.export``."""

import sys

from .tools.export import main

if __name__ == "__main__":
    sys.exit(main())
