"""``python -m prn_ray.commands <command> ...``: the ``prn-ray`` console script without
installing it."""

import sys

from prn_ray.commands import main

if __name__ == "__main__":
    sys.exit(main())
