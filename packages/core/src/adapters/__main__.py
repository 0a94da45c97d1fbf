"""``python -m adapters``: the ``adapters`` command."""

import sys

from adapters.tools.cli import main

sys.exit(main())
