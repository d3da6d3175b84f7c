"""``python -m spectral_edit edit|eval ...`` (see ``spectral_edit.cli``)."""

import sys

from spectral_edit.cli import main

if __name__ == "__main__":
    sys.exit(main())
