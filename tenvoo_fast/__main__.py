"""``python -m tenvoo_fast``: the ``tenvoo-fast`` command line (:mod:`tenvoo_fast.ddpm.cli`)."""
import sys

from .ddpm.cli import main

sys.exit(main())
