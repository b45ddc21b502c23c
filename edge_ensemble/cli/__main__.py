"""``python -m edge_ensemble.cli``: the ``edge-ensemble`` command, for a Python without the console script."""

from . import main

if __name__ == "__main__":  # pragma: no cover  (the package __init__ has registered every command by now)
    main()
