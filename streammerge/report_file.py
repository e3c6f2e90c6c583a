"""The `--report FILE.json` of a merge: its path checked before anything is merged, the file written whole.

A report that cannot be written is known before the merge starts (a directory, a missing or read-only parent,
a device such as /dev/full, the output itself or a path inside a directory output), so a run never ends with a
merged model and a failed report, and the report can never replace the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from streammerge import strict_json
from streammerge.errors import OutputError


def check_report_path(report: Path, output: Path) -> None:
    report, output = Path(report), Path(output)
    real_report, real_output = os.path.realpath(report), os.path.realpath(output)
    if real_report == real_output or real_report.startswith(real_output.rstrip(os.sep) + os.sep):
        raise OutputError(f"--report {report} is {'the output' if real_report == real_output else 'inside the output'}"
                          f" {output}; writing the report there would replace or mix with the merged model. Give the "
                          "report another path.")
    if report.is_dir():
        raise OutputError(f"--report {report} is a directory; give the path of a .json file to write.")
    if report.exists() and not report.is_file():
        raise OutputError(f"--report {report} is not a regular file (a device or a pipe); give the path of a .json "
                          "file to write.")
    parent = report.parent if str(report.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"--report {report}: its directory {parent} does not exist; create it or choose another "
                          "path.")
    if not os.access(parent, os.W_OK | os.X_OK) or (report.exists() and not os.access(report, os.W_OK)):
        raise OutputError(f"--report {report}: {'the file' if report.exists() else f'its directory {parent}'} is not "
                          "writable; choose another path.")


def write_report(report: Path, data: dict, output: Path) -> None:
    """Write the report under a temporary name beside it and rename it into place."""
    report = Path(report)
    temporary = report.with_name(f".{report.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(strict_json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, report)
    except OSError as exc:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise OutputError(f"the merge completed and {output} was written, but the report {report} could not be "
                          f"written ({exc.strerror or exc}).") from None
