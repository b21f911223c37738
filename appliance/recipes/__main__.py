"""`python -m appliance.recipes`: see the package's docstring."""

import sys

from . import main

sys.exit(main())
