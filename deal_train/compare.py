"""``python -m deal_train.compare``: kept for the documented command; the tool lives in ``deal_train.tools.compare``."""

import sys

from .tools.compare import main

if __name__ == "__main__":
    sys.exit(main())
