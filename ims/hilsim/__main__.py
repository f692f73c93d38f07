"""``python -m ims.hilsim --inventory FILE --port P``."""
from __future__ import annotations

import sys

from ims.hilsim.server import main

sys.exit(main())
