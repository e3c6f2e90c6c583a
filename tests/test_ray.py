"""`--ray`: the merge's tasks on a real two-node Ray cluster on this machine (loopback only). Same bytes as the
single-process run; a worker killed mid-task is retried; a failing task leaves nothing; a node that cannot see
an input is refused by name; a sweep on the cluster scores like the local one.

One cluster (a head and a second node, one CPU each) is shared by the module and always shut down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import merge_in_process, save
from safety_support import run_main
from test_sweep import make_models, sweep_file
from test_workers import config_for, make_inputs, same_bytes

from streammerge.config import parse_config
from streammerge.engine import prepare
from streammerge.errors import StreamMergeError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'streammerge[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

LOOPBACK = "127.0.0.1"
STORE = 80 * 2**20  # object store per node: tasks pass no tensor data through it
assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # conftest.py: loopback clusters only


@pytest.fixture(scope="module")
def cluster():
    started = time.monotonic()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": LOOPBACK, "include_dashboard": False, "object_store_memory": STORE})
    try:
        c.add_node(num_cpus=1, node_ip_address=LOOPBACK, object_store_memory=STORE)
        c.wait_for_nodes(timeout=120)
        assert time.monotonic() - started < 300, "the cluster took too long to start"
        yield c
    finally:
        try:
            ray.shutdown()
        finally:
            c.shutdown()


@pytest.fixture(scope="module")
def executor(cluster):
    from streammerge.distributed.executors import RayCluster

    ex = RayCluster(cluster.address)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def test_the_cluster_has_two_nodes(executor):
    assert len(executor.nodes) == 2 and executor.slots == 2
    assert all(n["NodeManagerAddress"] == LOOPBACK for n in executor.nodes)


@pytest.mark.parametrize("method, output", [("linear", "out.safetensors"), ("ties", "out"),
                                            ("dare_ties", "out.safetensors"), ("slerp", "out.pth"),
                                            ("ties", "out.pth")])
def test_same_bytes_as_the_single_process_run(tmp_path, inputs, executor, method, output):
    from streammerge.distributed.driver import run_distributed

    config = config_for(method, inputs, tmp_path / output)
    merge_in_process({**config, "output": str(tmp_path / f"single-{output}")})
    prepared = prepare(parse_config(config))
    try:
        report = run_distributed(prepared, executor, quiet=True)
    finally:
        prepared.close()
    assert report.executor.startswith("a Ray cluster of 2 node(s)") and report.tasks >= 2
    assert same_bytes(tmp_path / f"single-{output}", tmp_path / output)


def test_a_failing_task_leaves_nothing(tmp_path, inputs, executor):
    from streammerge.distributed.driver import run_distributed

    paths, _ = inputs
    bad = torch.load(paths[1])
    bad["b.weight"][1, 2] = float("nan")
    bad_path = save(bad, tmp_path / "bad.pth")
    for output in ("o.safetensors", "o"):
        config = {"models": [str(paths[0]), str(bad_path)], "output": str(tmp_path / output), "shard_size": 400_000}
        prepared = prepare(parse_config(config))
        try:
            with pytest.raises(StreamMergeError, match="'b.weight' has NaN or Inf") as info:
                run_distributed(prepared, executor, quiet=True)
        finally:
            prepared.close()
        assert str(bad_path) in str(info.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_command_line_and_a_worker_killed_mid_task(tmp_path, cluster):
    import synth

    models = synth.write_models(tmp_path / "models", 3, "safetensors", shrink=8)
    data = {"method": "ties", "base": str(models[0]), "output": str(tmp_path / "out.safetensors"),
            "models": [{"path": str(m), "weight": 0.5, "density": 0.5} for m in models[1:]]}
    merge_in_process({**data, "output": str(tmp_path / "single.safetensors")})
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump(data))
    process = subprocess.Popen([sys.executable, "-m", "streammerge", "merge", str(config), "--ray", cluster.address,
                                "--max-ram", "340MiB", "--report", str(tmp_path / "r.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and process.poll() is None and time.monotonic() < deadline:
            for child in psutil.Process().children(recursive=True):  # the cluster's processes are ours
                try:
                    if child.cmdline()[:1] == ["ray::run_group"] or child.name().startswith("ray::run_group"):
                        child.kill()  # by PID: Ray must retry its task elsewhere
                        killed = child.pid
                        break
                except psutil.Error:
                    continue
            time.sleep(0.02)
        _, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert killed is not None, "no task was seen running"
    assert process.returncode == 0, stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["executor"].startswith("a Ray cluster of 2 node(s)")
    assert report["task_peak_anon_bytes"] <= report["task_ram_bytes"] == 340 * 2**20
    assert same_bytes(tmp_path / "single.safetensors", tmp_path / "out.safetensors")


def test_sweep_on_the_cluster_scores_like_the_local_one(tmp_path, cluster):
    (tmp_path / "models").mkdir()
    models = make_models(tmp_path / "models")
    path = sweep_file(tmp_path, models, f"{sys.executable} {tmp_path / 'score.py'} {{output}}")
    local = run_main("sweep", path, "--quiet")  # the reference, in-process; the Ray runs are real commands
    assert local.returncode == 0, local.stderr
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]
    shutil.move(tmp_path / "sweep", tmp_path / "local")
    on_ray = run_cli("sweep", path, "--quiet", "--ray", cluster.address)
    assert on_ray.returncode == 0, on_ray.stderr
    ray_rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]
    assert [r["score"] for r in ray_rows] == [r["score"] for r in rows] and None not in [r["score"] for r in rows]
    assert {r["status"] for r in ray_rows} == {"merged"}
    for r in ray_rows:
        assert same_bytes(Path(r["output"]), tmp_path / "local" / Path(r["output"]).name)
    again = run_cli("sweep", path, "--quiet", "--ray", cluster.address)
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]} == {"reused"}


# A worker node joining the cluster at argv[1], as Cluster.add_node starts one (`ray start` refuses a multi-node
# cluster while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); its processes end with it (SIGTERM).
NODE_SCRIPT = """
import signal, sys, time
import ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(
    gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0, object_store_memory=int(sys.argv[2]),
    min_worker_port=0, max_worker_port=0, include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
while True:
    time.sleep(1)
"""


# Last in the module: the extra node it starts leaves the cluster at the end.
def test_a_node_that_cannot_see_an_input_is_refused(tmp_path, inputs, executor, cluster):
    from streammerge.distributed.driver import run_distributed

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root to give one node its own mounts")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    paths, _ = inputs
    moved = [Path(shutil.copy(p, hidden / p.name)) for p in paths[:2]]
    # A third node whose view of `hidden` is an empty tmpfs, as on a machine without that mount.
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs none {hidden} && exec {sys.executable} -c \"$0\" {cluster.address} {STORE}", NODE_SCRIPT],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len([n for n in ray.nodes() if n["Alive"]]) < 3:
            assert node.poll() is None, node.stderr.read()
            assert time.monotonic() < deadline, "the third node did not join"
            time.sleep(0.5)
        config = {"models": [str(p) for p in moved], "output": str(tmp_path / "o.safetensors")}
        prepared = prepare(parse_config(config))
        try:
            with pytest.raises(StreamMergeError) as info:
                run_distributed(prepared, executor, quiet=True)
        finally:
            prepared.close()
        message = str(info.value)
        assert "Ray node" in message and "cannot see it" in message and str(moved[0]) in message, message
        assert "shared file system" in message
        assert not (tmp_path / "o.safetensors").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["hidden"]
    finally:
        family = []
        try:
            family = psutil.Process(node.pid).children(recursive=True)
        except psutil.Error:
            pass
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        for p in family:  # whatever the node started, by PID
            try:
                p.kill()
            except psutil.Error:
                pass
