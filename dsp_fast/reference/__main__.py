"""python -m dsp_fast.reference: the reference trainer's command line (dsp_fast/reference/job.py `main`)."""

import sys

from dsp_fast.reference.job import main

sys.exit(main())
