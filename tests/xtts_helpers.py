"""Small XTTS-shaped checkpoints as people have them, and the two references the .pth output must satisfy:
the classic load-everything merge script, and Coqui's checkpoint loader."""

from __future__ import annotations

import torch
from synth import state_dict, trainer_checkpoint, xtts_entries

SHRINK = 32
# Coqui's trainer saves the whole training wrapper: the XTTS model under `xtts.` plus these.
TRAINER_EXTRAS = {
    "dvae.encoder.0.weight": (8, 8),
    "torch_mel_spectrogram_dvae.mel_stft.spectrogram.window": (16,),
    "torch_mel_spectrogram_style_encoder.mel_stft.spectrogram.window": (16,),
}


def write_trainer(path, seed: int, step: int, epoch: int, losses: tuple, prefix: str = "", extras: bool = False,
                  optimizer: bool = False, config=None) -> None:
    model = state_dict(seed, shrink=SHRINK)
    if extras:
        g = torch.Generator().manual_seed(seed)
        model.update({name: torch.randn(shape, generator=g) for name, shape in TRAINER_EXTRAS.items()})
    torch.save(trainer_checkpoint(model, step, epoch, *losses, prefix=prefix, optimizer=optimizer, config=config),
               path)


def write_plain(path, seed: int) -> None:
    torch.save(state_dict(seed, shrink=SHRINK), path)


def seed_merge(paths, weights: list[float], take_first=lambda name: False, prefixes=None) -> dict:
    """What the classic guide's script writes: everything loaded, sum w_i * ckpt_i["model"][key] with normalized
    weights (`take_first` names copied from model 0), first config, max step/epoch, weighted losses."""
    ckpts = [torch.load(p, weights_only=True) for p in paths]
    states = [c["model"] if "model" in c else c for c in ckpts]
    if prefixes:
        states = [{k.removeprefix(p): v for k, v in s.items()} for s, p in zip(states, prefixes)]
    total = sum(weights)
    w = [x / total for x in weights]
    merged = {}
    for key, first in states[0].items():
        if key not in states[1]:
            continue
        if first.is_floating_point() and not take_first(key):
            merged[key] = sum(wi * s[key] for wi, s in zip(w, states))
        else:
            merged[key] = first
    out = {"model": merged, "config": ckpts[0]["config"], "step": max(c["step"] for c in ckpts),
           "epoch": max(c["epoch"] for c in ckpts)}
    out["model_loss"] = {k: sum(wi * c["model_loss"][k] for wi, c in zip(w, ckpts))
                         for k in ("train_loss", "eval_loss")}
    return out


def xtts_module() -> torch.nn.Module:
    """A module with exactly XTTS-v2's parameter and buffer names and shapes (at the test size)."""
    root = torch.nn.Module()
    for name, shape, dtype in xtts_entries(SHRINK):
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, torch.nn.Module())
            node = node._modules[part]
        if dtype.is_floating_point:
            node.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))
        else:
            node.register_buffer(leaf, torch.zeros(shape, dtype=dtype))
    return root


def coqui_load(path, module: torch.nn.Module) -> dict:
    """Coqui's Xtts.get_compatible_checkpoint_state_dict + load_state_dict(strict=True), as it reads a file."""
    checkpoint = torch.load(path, map_location=torch.device("cpu"), weights_only=True)["model"]
    ignore_keys = ["torch_mel_spectrogram_style_encoder", "torch_mel_spectrogram_dvae", "dvae"]
    for key in list(checkpoint.keys()):
        if key.startswith("xtts."):
            new_key = key.replace("xtts.", "")
            checkpoint[new_key] = checkpoint[key]
            del checkpoint[key]
            key = new_key
        if key.split(".")[0] in ignore_keys:
            del checkpoint[key]
    module.load_state_dict(checkpoint, strict=True)
    return checkpoint


def assert_same_state(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, ref in expected.items():
        value = got[key]
        assert value.dtype == ref.dtype and value.shape == ref.shape, key
        if ref.is_floating_point():
            torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-9, msg=key)
        else:
            assert torch.equal(value, ref), key


def run_in_process(capsys, *args):
    """`streammerge ARGS` in this process (no interpreter and torch start-up per call); like run_cli's result."""
    from types import SimpleNamespace

    from streammerge.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
