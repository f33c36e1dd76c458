"""``python -m hessfast analyze | demo | info | --version``."""

import sys

from .cli import main

sys.exit(main())
