"""What unpickling a checkpoint builds is bounded as it is built: legacy (non-zip) pickles, which have no size
to check up front, and zip pickles made of objects that cost more than the up-front estimate (empty containers)
stop at the budget with a clear error instead of passing it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

OPEN_UNDER_A_BUDGET = textwrap.dedent("""
    import json, sys
    import torch
    from streammerge.errors import StreamMergeError
    from streammerge.io import open_checkpoint
    from streammerge.memory import MemoryGuard, anon_rss

    path, room, kind, legacy = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "legacy"
    count = 600_000
    empty = {"lists": lambda: [[] for _ in range(count)], "dicts": lambda: [{} for _ in range(count)],
             "none": lambda: [None] * 8}[kind]()
    torch.save({"model": {"w": torch.ones(4)}, "junk": empty}, path, _use_new_zipfile_serialization=not legacy)
    del empty
    import gc; gc.collect()
    limit = anon_rss() + room
    outcome = "opened"
    with MemoryGuard(limit + 2**40, interval=0.001) as guard:  # only measures
        try:
            open_checkpoint(path, max_ram=limit).close()
        except StreamMergeError as exc:
            outcome = str(exc)
    print(json.dumps({"outcome": outcome, "over": guard.peak - limit}))
""")


def open_under_budget(tmp_path, kind: str, layout: str, room_mib: int) -> dict:
    run = subprocess.run([sys.executable, "-c", OPEN_UNDER_A_BUDGET, str(tmp_path / "x.pth"),
                          str(room_mib * 2**20), kind, layout], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["legacy", "zip"])
@pytest.mark.parametrize("kind", ["lists", "dicts"])
def test_a_pickle_of_empty_containers_stops_at_the_budget(tmp_path, kind, layout):
    """600,000 empty containers: a pickle of 3-4 MB (its 10x estimate fits 48 MiB) that builds 60-130 MiB."""
    result = open_under_budget(tmp_path, kind, layout, room_mib=48)
    assert "beyond the budget" in result["outcome"] and "x.pth" in result["outcome"], result
    assert result["over"] <= 4 * 2**20, result  # checked every 16 KiB of pickle, with room kept for the memo's next growth


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_an_ordinary_pickle_opens_under_the_same_budget(tmp_path, layout):
    result = open_under_budget(tmp_path, "none", layout, room_mib=48)
    assert result["outcome"] == "opened", result
