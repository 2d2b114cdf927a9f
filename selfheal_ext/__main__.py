"""``python -m selfheal_ext`` runs the ``selfheal`` command line."""
import sys

from .cli import main

sys.exit(main())
