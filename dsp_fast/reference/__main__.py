"""python -m dsp_fast.reference: the reference trainer's command line (dsp_fast/reference/runner.py `main`)."""

import sys

from dsp_fast.reference.runner import main

sys.exit(main())
