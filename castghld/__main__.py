"""`python -m castghld` is the `castghld` command."""

import sys

from castghld.cli import main

sys.exit(main())
