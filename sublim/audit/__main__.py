"""``python -m sublim.audit [overrides]``: the audit of a dataset sublim did not make (sublim/audit/cli.py)."""

from sublim.audit.cli import main

if __name__ == "__main__":
    main()
