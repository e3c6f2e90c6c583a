import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # synth.py: realistic synthetic checkpoints


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m streammerge ...` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
