"""``python -m deal_train.bench``: kept for the documented command; the tool lives in ``deal_train.tools.bench``."""

import sys

from .tools.bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
