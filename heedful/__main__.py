"""``python -m heedful``: the command line, for environments without the ``heedful`` script."""

from heedful.cli import entry

entry()
