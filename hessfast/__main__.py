"""``python -m hessfast info | demo``."""

import sys

from .cli import main

sys.exit(main())
