"""``python -m moorelm`` (also what ``torchrun -m moorelm`` runs on every rank)."""

import sys

from moorelm.cli import main

sys.exit(main())
