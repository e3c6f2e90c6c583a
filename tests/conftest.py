import ctypes
import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

# Ray clusters the tests start live on 127.0.0.1 only. Ray reads this when it is imported and otherwise resolves
# 127.0.0.1 to the machine's interface address; set here, before any test imports Ray, and inherited by every
# process the tests start.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# Tests send Ctrl-C to the merges they start. A test run started in the background of a non-interactive shell
# inherits SIGINT ignored, and so would every merge it starts: give this process (and so its children) the
# usual Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)

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


@pytest.fixture(autouse=True, scope="module")
def release_freed_memory():
    """After each test module, hand the memory its tests freed back to the system. Tests run merges in this process,
    and a merge's budget counts what the process already holds; glibc keeps freed heap pages (in every thread's
    arena) until asked, so without this the process looks larger with every module."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
