"""``python -m examples.detector``: train on synthetic scenes, report held-out metrics."""

import sys

from .train import main

sys.exit(main())
