"""The script torchrun runs: `torchrun --nproc-per-node N launcher/train.py [CONFIG] [overrides]`.

Same as `dtrain train`; works from a source checkout without installing the package.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_train.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
