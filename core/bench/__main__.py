"""``python -m qpeft.bench CELL.json`` runs one cell; ``python -m qpeft.bench --worker`` a worker."""

import sys

from .cell import cell_main, worker_main

sys.exit(worker_main() if sys.argv[1:] == ["--worker"] else cell_main())
