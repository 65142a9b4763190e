"""``python -m nanobot`` runs the CLI."""

import sys

from nanobot.cli import main

# The guard matters: document extractors are spawned processes, which re-import this module.
if __name__ == "__main__":
    sys.exit(main())
