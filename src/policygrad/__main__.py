"""``python -m policygrad`` is the ``policygrad`` command."""

import sys

from policygrad.cli import main

sys.exit(main())
