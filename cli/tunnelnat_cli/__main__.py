"""``python -m tunnelnat.cli``: the same as the ``tunnelnat`` console script."""

from tunnelnat.cli.app import main

raise SystemExit(main())
