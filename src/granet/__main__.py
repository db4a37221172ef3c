"""``python -m granet`` (also what ``torchrun -m granet`` runs)."""
import sys

from .cli import main

sys.exit(main())
