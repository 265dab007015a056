"""`python -m distributed_train ...` is `dtrain ...`."""

import sys

from distributed_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
