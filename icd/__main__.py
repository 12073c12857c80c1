"""`python -m icd ...`: the `icd` console script without an installed entry point."""

import sys

from icd.cli import main

if __name__ == "__main__":  # spawned ranks re-import this module as __mp_main__: they must not rerun it
    sys.exit(main())
