"""``python -m gmemfast``: the ``gmemfast`` command."""
import sys

from .cli import main

sys.exit(main())
