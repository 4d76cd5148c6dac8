"""``python -m qmpvm``."""

import sys

from qmpvm.cli import main

sys.exit(main())
