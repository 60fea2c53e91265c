"""`python -m mqtun` runs the command-line tool."""

from mqtun.cli import main

raise SystemExit(main())
