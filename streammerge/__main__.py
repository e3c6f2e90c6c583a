"""The `streammerge` command: the console script and `python -m streammerge`."""

import gc
import os
import sys


def command() -> None:
    """Run the command line and hand its exit status straight to the operating system."""
    # Importing torch makes hundreds of thousands of objects that live as long as the process, and the collector
    # would walk the growing heap again and again (a fifth of a second). Once imported they are set aside for
    # good, with the little garbage among them (about 1 MiB).
    gc.disable()
    from streammerge.cli import main
    gc.freeze()
    gc.enable()
    status = main()
    # Everything the command wrote is closed, fsynced and renamed into place by now; Python's own teardown of
    # torch's thousands of modules would add half a second to every command.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
    os._exit(status)


if __name__ == "__main__":
    command()
