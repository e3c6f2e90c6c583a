"""`--workers N`: the same merge split into tasks of whole tensors on local worker processes gives the same
bytes as the single-process run, for every method and every output kind; failures leave nothing behind and
an interrupted distributed run can be resumed."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import merge_in_process, save
from safety_support import (assert_clean_failure, done_shards, freeze, in_progress, interrupt, listing, run_main,
                            start_merge, wait_for)

import synth
from streammerge.config import parse_config
from streammerge.distributed.driver import run_distributed
from streammerge.distributed.executors import LocalWorkers
from streammerge.engine import prepare
from streammerge.memory import CHUNK_ALIGN
from streammerge.methods.registry import get_method, methods

OUTPUTS = ["out.safetensors", "out.pth", "out"]  # single file, torch checkpoint, sharded directory


def make_inputs(tmp: Path):
    """A base and three fine-tunes: tensors spanning several statistics blocks, a tied pair, an int counter."""
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (600, 300), "a.weight": (513, 257), "a.bias": (513,), "b.weight": (300, 400),
              "c.weight": (2000, 70), "norm.weight": (64,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    paths = []
    for k in range(3):
        model = {n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in base.items()}
        model["head.weight"] = model["embed.weight"]  # tied
        model["bn.num_batches_tracked"] = torch.tensor(9)
        paths.append(save(model, tmp / f"model{k}.pth"))
    base["head.weight"] = base["embed.weight"]
    base["bn.num_batches_tracked"] = torch.tensor(9)
    return paths, save(base, tmp / "base.pth")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def workers():
    executor = LocalWorkers(2)
    yield executor
    executor.close()


# The budget of a distributed run whose driver is this test process: the total for the driver, however large the
# test process has grown by then (it holds every earlier test's leftovers), and its workers.
IN_PROCESS_RAM = "3GiB"


def config_for(method_name: str, inputs, output: Path) -> dict:
    method = get_method(method_name)
    paths, base = inputs
    count = method.min_models if method.max_models == method.min_models else 2
    models = []
    for i, path in enumerate(paths[:count]):
        params = {p.name: value for p in method.model_params
                  for name, value in (("weight", [0.6, 0.4, 0.3][i]), ("density", 0.5)) if p.name == name}
        models.append({"path": str(path), **params})
    config = {"method": method_name, "models": models, "output": str(output), "shard_size": 400_000, "seed": 7,
              "max_ram": IN_PROCESS_RAM}
    config.update({p.name: 0.5 for p in method.method_params if p.default is None})  # required ones (nearswap's t)
    if method.uses_base:
        config["base"] = str(base)
    return config


def same_bytes(a: Path, b: Path) -> bool:
    if a.is_dir():
        names = sorted(os.listdir(a))
        return names == sorted(os.listdir(b)) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    return filecmp.cmp(a, b, shallow=False)


def single_and_distributed(tmp: Path, config: dict, executor):
    output = Path(config["output"])
    single, spread = tmp / f"single-{output.name}", tmp / f"spread-{output.name}"
    merge_in_process({**config, "output": str(single)}, chunk=CHUNK_ALIGN)  # smallest chunks: many per tensor
    prepared = prepare(parse_config({**config, "output": str(spread)}))
    try:
        report = run_distributed(prepared, executor, quiet=True)
    finally:
        prepared.close()
    return single, spread, report


@pytest.mark.parametrize("method", methods().names())
def test_every_method_gives_the_single_process_bytes(tmp_path, inputs, workers, method):
    single, spread, report = single_and_distributed(tmp_path, config_for(method, inputs, tmp_path / "out.pth"),
                                                    workers)
    assert report.tasks >= 2 and report.executor == "2 local worker processes"
    assert same_bytes(single, spread)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_every_output_kind_gives_the_single_process_bytes(tmp_path, inputs, workers, method, output):
    single, spread, report = single_and_distributed(tmp_path, config_for(method, inputs, tmp_path / output), workers)
    assert same_bytes(single, spread)
    if output == "out":
        assert len(report.files) > 3  # several shards and the index
    assert report.task_peak_anon_bytes <= report.task_ram_bytes


def test_nonfinite_allowed_is_listed_from_the_workers(tmp_path, inputs, workers):
    paths, _ = inputs
    bad = torch.load(paths[1])
    bad["a.bias"][3] = float("nan")
    bad_path = save(bad, tmp_path / "bad.pth")
    config = {"models": [str(paths[0]), str(bad_path)], "output": str(tmp_path / "o.safetensors"),
              "max_ram": IN_PROCESS_RAM}
    prepared = prepare(parse_config(config))
    try:
        report = run_distributed(prepared, workers, quiet=True, allow_nonfinite=True)
    finally:
        prepared.close()
    assert report.nonfinite_tensors == ["a.bias"]


# -- through the command line -------------------------------------------------------------------------------

def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def test_command_line_workers_and_config_key(tmp_path, inputs):
    config = config_for("ties", inputs, tmp_path / "cli.safetensors")
    merge_in_process({**config, "output": str(tmp_path / "single.safetensors")})
    path = write_yaml(tmp_path / "m.yaml", {**config, "workers": 2})
    result = run("merge", path, "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["executor"] == "2 local worker processes" and report["tasks"] >= 2
    assert "task(s) on 2 local worker processes" in result.stderr
    assert same_bytes(tmp_path / "single.safetensors", tmp_path / "cli.safetensors")
    # --workers on the command line overrides the config (1: the single-process run)
    result = run_main("merge", path, "--workers", "1", "--output", tmp_path / "one.safetensors", "--report",
                 tmp_path / "r1.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r1.json").read_text())["executor"] == ""
    assert same_bytes(tmp_path / "single.safetensors", tmp_path / "one.safetensors")


def test_nan_in_a_worker_leaves_nothing(tmp_path, inputs):
    paths, _ = inputs
    bad = torch.load(paths[1])
    bad["c.weight"][5, 5] = float("inf")
    bad_path = save(bad, tmp_path / "bad.pth")
    for output, runner in (("o.pth", run), ("odir", run_main)):  # the command itself, then its code in-process
        path = write_yaml(tmp_path / "m.yaml", {"models": [str(paths[0]), str(bad_path)],
                                                 "output": str(tmp_path / output), "shard_size": 400_000,
                                                 "max_ram": IN_PROCESS_RAM})
        result = runner("merge", path, "--workers", "2")
        assert_clean_failure(result, tmp_path / output, "'c.weight'", str(bad_path))


@pytest.mark.parametrize("config, fragment", [
    ({"workers": 0}, "not a number of worker processes"),
    ({"workers": "many"}, "not a number of worker processes"),
    ({"workers": 2, "ray": {}}, "either 'workers'"),
    ({"ray": {"adress": "auto"}}, "unknown key 'adress'"),
    ({"ray": "auto"}, "'ray' must be a mapping"),
])
def test_bad_scale_keys_are_refused(tmp_path, inputs, config, fragment):
    path = write_yaml(tmp_path / "m.yaml", {"models": [str(p) for p in inputs[0][:2]],
                                            "output": str(tmp_path / "o.safetensors"), **config})
    result = run_main("merge", path)  # exit status and message through `main`; the process is tested below
    assert result.returncode == 1 and fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_too_many_workers_for_the_budget(tmp_path, inputs):
    path = write_yaml(tmp_path / "m.yaml", {"models": [str(p) for p in inputs[0][:2]],
                                            "output": str(tmp_path / "o.safetensors")})
    result = run("merge", path, "--workers", "64", "--max-ram", "1GiB")
    assert_clean_failure(result, tmp_path / "o.safetensors", "--workers 64", "fewer workers")


def test_ray_missing_says_how_to_install(tmp_path, inputs):
    fake = tmp_path / "noray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), *filter(None, [os.environ.get("PYTHONPATH")]),
                                                        str(Path(__file__).resolve().parent.parent)])}
    path = write_yaml(tmp_path / "m.yaml", {"models": [str(p) for p in inputs[0][:2]],
                                            "output": str(tmp_path / "o.safetensors")})
    result = run("merge", path, "--ray", env=env)
    assert_clean_failure(result, tmp_path / "o.safetensors", "pip install 'streammerge[ray]'")


def test_resume_after_an_interrupted_distributed_run(tmp_path):
    models = synth.write_models(tmp_path / "models", 3, "safetensors", shrink=16)
    out = tmp_path / "out"
    data = {"method": "ties", "base": str(models[0]), "output": str(out), "shard_size": "1MB",
            "models": [{"path": str(m), "weight": 0.5, "density": 0.5} for m in models[1:]]}
    merge_in_process({**data, "output": str(tmp_path / "single")})
    path = write_yaml(tmp_path / "m.yaml", data)
    process = start_merge(path, "--quiet", "--workers", "2")
    try:
        started = wait_for(lambda: len(done_shards(out)) >= 2, process, interval=0.01)
        family = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)  # no cleanup at all: as if the machine went down
        for child in family:  # its worker processes, by PID
            child.kill()
        process.communicate(timeout=60)
    finally:
        process.kill()
    if not started or (out / "model.safetensors.index.json").exists():
        pytest.skip("the merge finished before it could be interrupted")
    # the killed run was the real process; this one runs in the test process, so with its budget
    result = run_main("merge", path, "--resume", "--workers", "2", "--max-ram", IN_PROCESS_RAM)
    assert result.returncode == 0, result.stderr
    assert "already complete and verified" in result.stderr, result.stderr
    assert same_bytes(tmp_path / "single", out)


def test_hugging_face_model_with_a_union_tokenizer_and_slices(tmp_path):
    """Everything a task rebuilds from the config (tokenizer union, row sources, layer slices) gives the
    single-process bytes: weights, config.json and tokenizer."""
    from hf_models import build_llama

    base = build_llama(tmp_path / "base", seed=0, layers=4)
    added = build_llama(tmp_path / "added", seed=1, layers=4, like=base, added_tokens=[f"<new{i}>" for i in range(8)])
    config = {"merge_method": "ties", "base_model": str(base), "tokenizer_source": "union", "dtype": "float32",
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]},
                                      {"model": str(added), "layer_range": [0, 3],
                                       "parameters": {"weight": 0.7, "density": 0.5}}]},
                         {"sources": [{"model": str(base), "layer_range": [2, 4]},
                                      {"model": str(added), "layer_range": [2, 4],
                                       "parameters": {"weight": 0.7, "density": 0.5}}]}]}
    path = write_yaml(tmp_path / "m.yaml", config)
    for name, extra, runner in (("single", [], run_main), ("spread", ["--workers", "2"], run)):
        result = runner("merge", path, tmp_path / name, "--quiet", *extra)
        assert result.returncode == 0, result.stderr
    files = sorted(os.listdir(tmp_path / "single"))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert files == sorted(os.listdir(tmp_path / "spread"))
    for name in files:
        if name == "README.md":  # the model card is titled with the output's name
            card = (tmp_path / "single" / name).read_text().replace("# single", "# spread")
            assert card == (tmp_path / "spread" / name).read_text()
        else:
            assert filecmp.cmp(tmp_path / "single" / name, tmp_path / "spread" / name, shallow=False), name


def test_sigterm_stops_the_workers_and_removes_everything(tmp_path):
    models = synth.write_models(tmp_path / "models", 3, "safetensors", shrink=16)
    out = tmp_path / "out"
    path = write_yaml(tmp_path / "m.yaml", {"models": [str(m) for m in models], "output": str(out),
                                            "shard_size": "1MB", "method": "ties", "base": str(models[0])})
    process = start_merge(path, "--quiet", "--workers", "2")
    try:
        assert wait_for(lambda: in_progress(out), process), "the merge ended before it could be interrupted"
        freeze(process)  # (stopped while its workers are listed: the merge cannot end in between)
        # Forked workers run the driver's command line (spawned ones multiprocessing's): anything but its helper.
        workers = [c for c in psutil.Process(process.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(c.cmdline())]
        interrupt(process, out, signal.SIGTERM, workers)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "SIGTERM" in stderr, stderr
    assert len(workers) == 2
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []  # the driver stopped its workers before it exited
    assert not out.exists(), listing(out)
    assert sorted(os.listdir(tmp_path)) == ["m.yaml", "models"]


def test_workers_are_forked_only_from_a_small_driver_running_no_other_thread():
    """A driver running no other thread and holding at most half a worker's share forks its workers (they start
    at once, with torch already loaded); one with a thread running spawns them (a fork could inherit a lock that
    thread holds), and so does one holding more (a forked worker's memory starts at the driver's)."""
    script = ("import threading\n"
              "from streammerge.distributed.executors import worker_start_method as method\n"
              "print(method(100, 200), method(101, 200))\n"
              "stop = threading.Event(); threading.Thread(target=stop.wait).start()\n"
              "print(method(100, 200)); stop.set()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["fork", "spawn", "spawn"]


def test_a_driver_holding_more_than_a_workers_share(tmp_path, inputs):
    """An application holding much memory runs a distributed merge: its workers are spawned (a forked one would
    start at the driver's memory) and the split's estimate of a task's chunks does not hold them to the
    driver's baseline either."""
    from streammerge.distributed.driver import run_prepared
    from streammerge.memory import anon_rss

    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touched: anonymous memory this process holds
    paths, _ = inputs
    out = tmp_path / "o.safetensors"
    max_ram = anon_rss() + 2 * 260 * 2**20  # each worker's share, 260 MiB, is less than what the driver holds
    prepared = prepare(parse_config({"models": [str(p) for p in paths], "output": str(out)}), None, max_ram)
    report = run_prepared(prepared, quiet=True, workers=2)
    assert report.tasks >= 2 and report.task_ram_bytes < anon_rss()
    single = tmp_path / "single.safetensors"
    merge_in_process({"models": [str(p) for p in paths], "output": str(single)}, max_ram=max_ram)
    assert filecmp.cmp(out, single, shallow=False)
    del ballast
