"""``python -m sublim.audit [overrides]``: the audit of a dataset sublim did not make (sublim/audit/cli.py)."""

from sublim.audit.cli import main
from sublim.train import entry

if __name__ == "__main__":
    entry(main)
