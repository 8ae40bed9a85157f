"""What the tests share: servers and processes to start, sources to write, read models to check.

One module per subject; a helper lives in exactly one of them.
"""

from pathlib import Path

# The repository's root: where the services are imported from, and the working folder of their processes.
ROOT = Path(__file__).resolve().parents[2]
