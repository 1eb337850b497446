"""Calibration check of the quality profiler; see ``evicpress_sglang/bench/calibration.py``.

Example (GPU machine): python bench/calibration.py --out bench/results/<date>-profiler-calibration
"""

import sys

from evicpress_sglang.bench.calibration import main

if __name__ == "__main__":
    sys.exit(main())
