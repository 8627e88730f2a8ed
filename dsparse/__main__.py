"""``python -m dsparse ...`` (what ``torchrun -m dsparse train ...`` runs)."""

import sys

from dsparse.cli import main

sys.exit(main())
