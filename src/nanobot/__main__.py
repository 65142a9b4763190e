"""``python -m nanobot`` runs the CLI."""

import sys

from nanobot.cli import main

sys.exit(main())
