"""``python -m pare`` runs the ``pare`` command."""

from pare.cli import main

raise SystemExit(main())
