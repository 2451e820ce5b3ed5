"""`python -m gastro_dist ...` is the same as the `gastro-dist` console script."""

from gastro_dist.cli import main

raise SystemExit(main())
