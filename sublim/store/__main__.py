"""``python -m sublim.store``: list, show, verify, remove and garbage-collect stored artifacts."""

from sublim.store.cli import main

raise SystemExit(main())
