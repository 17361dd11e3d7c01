"""Re-render or merge bench results without running anything:

python -m slimfit.bench.results render RUN_DIR_OR_JSON [--output DIR]
python -m slimfit.bench.results merge OUTPUT_DIR A.json B.json ...
"""

import sys

from .report import main

if __name__ == "__main__":
    sys.exit(main())
