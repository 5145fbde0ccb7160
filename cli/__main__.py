"""``python -m cli ...`` is ``encore ...`` (child processes use it: no console script needs to be on PATH)."""

from cli.main import main

main()
