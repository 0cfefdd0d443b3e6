"""``python -m brainage_xai``: the ``brainage-xai`` command, where its script is not on PATH.

(``python -m brainage_xai.cli.run`` works too, but Python warns there because
:mod:`brainage_xai.cli` imports :mod:`.run` first.)
"""

import sys

from .cli.run import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
