"""``python -m sslbench`` = the ``sslbench`` command."""

from sslbench.cli import main

main()
