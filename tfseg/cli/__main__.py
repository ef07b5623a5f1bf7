"""``python -m tfseg.cli``: the same as the ``tfseg`` command."""

from tfseg.cli import main

main()
