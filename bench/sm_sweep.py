"""SM sweep of the model runner (issue 3): same as `bullet sweep`; see bullet_kernels/sweep.py."""

import sys

from bullet_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
