import sys

from bench.throughput.compare import main

sys.exit(main())
