import os
import sys

# Benchmark modules import their shared helpers (baselines, timing) by plain name.
sys.path.insert(0, os.path.dirname(__file__))
