"""``python -m client.loadtest``: load-test a convcore server and summarize it (see ``--help``)."""
import sys

from ._cli import main

# The guard matters: client processes are started with "spawn", which imports this module again as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
