"""``python -m sublim.report <sweep dir>``: rebuild a sweep's report."""

from sublim.report import main

main()
