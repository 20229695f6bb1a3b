"""``python -m sublim.audit [overrides]``: the audit of a dataset sublim did not make (sublim/audit/cli.py)."""

from sublim.audit.cli import CONF, main
from sublim.schema.overrides import refuse_bad_overrides

if __name__ == "__main__":
    refuse_bad_overrides(CONF)
    main()
