"""``python -m vault`` is the same as the ``secret-manager`` command."""

from vault.cli import main

raise SystemExit(main())
