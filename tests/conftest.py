import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import os

# Tests compare against fp32 references: pin the automatic dtype choice (the documented override) so
# they do not switch to bf16 on CPUs that have it; test_fastpath.py checks the automatic choice itself.
os.environ.setdefault("LATENTFORGE_DTYPE", "fp32")
