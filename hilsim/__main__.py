"""``python -m hilsim --inventory FILE --port P``."""
from __future__ import annotations

import sys

from hilsim.server import main

sys.exit(main())
