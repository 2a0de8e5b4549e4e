"""``python -m tunnelnat_cli``: the same as the ``tunnelnat`` console script."""

from tunnelnat_cli.app import main

raise SystemExit(main())
