"""Fixture trainer: refuses its arguments like argparse does: a usage line on stderr and exit 2."""

import sys

print("usage: trainer [--model M] ...\ntrainer: error: unrecognized arguments (fixture tests/trainers/usage.py)",
      file=sys.stderr, flush=True)
sys.exit(2)
