"""``python -m mlxgate_cli serve ...``: the same as the ``mlxgate`` command."""

import sys

from mlxgate_cli.main import main

sys.exit(main())
