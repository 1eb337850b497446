"""Does the quality profiler measure when the cache is full; see ``evicpress_sglang/bench/profiler_pressure.py``.

Example (GPU machine): python bench/profiler_pressure.py --model DIR --out /tmp/ppress
"""

import sys

from evicpress_sglang.bench.profiler_pressure import main

if __name__ == "__main__":
    sys.exit(main())
