"""`python -m mc_cli` = the `metacompress` console script."""

from mc_cli.main import main

raise SystemExit(main())
