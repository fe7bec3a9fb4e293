"""``python -m deal_train.results``: kept for the documented command; the tool lives in ``deal_train.tools.results``."""

import sys

from .tools.results import main

if __name__ == "__main__":
    sys.exit(main())
