"""python -m dev.gpu_kit: the kit's measurements (conductor)."""

import sys

from .conductor import main

sys.exit(main())
