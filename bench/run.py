"""EVICPRESS vs stock SGLang on one workload; see ``evicpress_sglang/bench/runner.py``.

Example (GPU machine): python bench/run.py --model dummy-8b --policies stock,hicache,static:int4,evicpress
"""

import sys

from evicpress_sglang.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
