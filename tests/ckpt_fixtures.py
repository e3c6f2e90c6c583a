"""Small checkpoints shaped like the ones people have: built in the tests, trusted, with known contents."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

XTTS_CONFIG_MODULE = "TTS.tts.configs.xtts_config"


def small_state_dict(seed: int = 0, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """A few tensors of the kinds real state dicts hold: several float dtypes, ints, a strided view, a tie."""
    gen = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    sd["encoder.weight"] = torch.randn(8, 6, generator=gen)
    sd["encoder.bias"] = torch.randn(8, generator=gen)
    sd["decoder.weight"] = torch.randn(6, 8, generator=gen).to(torch.bfloat16)
    sd["decoder.half"] = torch.randn(5, 3, generator=gen).to(torch.float16)
    sd["norm.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
    sd["mask"] = torch.rand(7, generator=gen) > 0.5
    sd["double"] = torch.randn(3, generator=gen, dtype=torch.float64)
    sd["transposed"] = torch.randn(4, 9, generator=gen).t()  # non-contiguous view of its storage
    sd["offset_slice"] = torch.randn(20, generator=gen)[5:12]  # storage offset
    sd["embed.weight"] = torch.randn(10, 4, generator=gen)
    sd["head.weight"] = sd["embed.weight"]  # tied: two names, one storage
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 4)
    sd._metadata = OrderedDict({"": {"version": 1}})
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def save_legacy(obj, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


@contextlib.contextmanager
def fake_modules(*module_names: str, **classes):
    """Make `module.Class` importable for the duration (so pickle can write or a trusted loader can read it)."""
    created = []
    try:
        for full in module_names:
            parts = full.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    created.append(name)
        for qualname, cls in classes.items():
            module = cls.__module__
            setattr(sys.modules[module], qualname, cls)
        yield
    finally:
        for name in reversed(created):
            sys.modules.pop(name, None)


# --- an XTTS-like pickled config: classes that are not importable when the checkpoint is read ----------------

@dataclasses.dataclass
class XttsAudioConfig:
    sample_rate: int = 22050
    output_sample_rate: int = 24000


@dataclasses.dataclass
class XttsArgs:
    gpt_layers: int = 30
    gpt_n_model_channels: int = 1024


@dataclasses.dataclass
class XttsConfig:
    model: str = "xtts"
    run_name: str = "finetune"
    audio: XttsAudioConfig = dataclasses.field(default_factory=XttsAudioConfig)
    model_args: XttsArgs = dataclasses.field(default_factory=XttsArgs)
    languages: list = dataclasses.field(default_factory=lambda: ["en", "de", "fr"])
    lr: float = 5e-6

    def __setstate__(self, state):  # would run under torch.load(weights_only=False), never under streammerge
        marker = os.environ.get("STREAMMERGE_TEST_MARKER")
        if marker:
            Path(marker).write_text("XttsConfig.__setstate__ ran")
        self.__dict__.update(state)


XTTS_CLASSES = {"XttsConfig": XttsConfig, "XttsAudioConfig": XttsAudioConfig, "XttsArgs": XttsArgs}
for _cls in XTTS_CLASSES.values():
    _cls.__module__ = XTTS_CONFIG_MODULE
    _cls.__qualname__ = _cls.__name__

XTTS_CONFIG_PLAIN = {"model": "xtts", "run_name": "finetune",
                     "audio": {"sample_rate": 22050, "output_sample_rate": 24000},
                     "model_args": {"gpt_layers": 30, "gpt_n_model_channels": 1024}, "languages": ["en", "de", "fr"],
                     "lr": 5e-6}


def xtts_modules():
    return fake_modules(XTTS_CONFIG_MODULE, **XTTS_CLASSES)


def coqui_trainer(model: dict, step: int = 1000, epoch: int = 3, optimizer: bool = True) -> dict:
    """A Coqui-trainer container: pickled XttsConfig, numpy losses, optimizer/scaler state."""
    ckpt = {
        "config": XttsConfig(),
        "model": model,
        "step": np.int64(step),
        "epoch": epoch,
        "date": "Nov-24-2026_10+00AM",
        "model_loss": {"train_loss": np.float64(1.25), "eval_loss": np.float32(2.5)},
    }
    if optimizer:
        ckpt["optimizer"] = {"state": {i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(64),
                                           "exp_avg_sq": torch.zeros(64)} for i in range(3)},
                             "param_groups": [{"lr": 5e-6, "betas": (0.9, 0.96), "params": [0, 1, 2]}]}
        ckpt["scheduler"] = {"last_epoch": epoch, "_last_lr": [5e-6]}
        ckpt["scaler"] = {"scale": 65536.0, "_growth_tracker": 12}
    return ckpt


def save_xtts_trainer(path: Path, model: dict, legacy: bool = False, **kwargs) -> Path:
    with xtts_modules():
        obj = coqui_trainer(model, **kwargs)
        if legacy:
            save_legacy(obj, path)
        else:
            torch.save(obj, path)
    return path


def load_trusted(path: Path):
    """The reference: torch.load(weights_only=False) of a file this test wrote itself."""
    with xtts_modules():
        return torch.load(path, map_location="cpu", weights_only=False)


def lightning_ckpt(model: dict) -> dict:
    return {
        "epoch": 4, "global_step": 5000, "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict(("model." + k, v) for k, v in model.items()),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.25),
                                                                    "best_model_path": "/ckpt/best.ckpt"}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(200), "exp_avg_sq": torch.zeros(200)}},
                              "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "lr_schedulers": [{"last_epoch": 4}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-4, "hidden": 8},
    }


def fairseq_ckpt(model: dict) -> dict:
    return {
        "args": argparse.Namespace(arch="transformer", lr=[0.0005], max_tokens=4096, fp16=True),
        "cfg": {"common": {"fp16": True}, "model": None},
        "model": model,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                               "num_updates": 1000}],
        "extra_state": {"epoch": 5, "val_loss": np.float64(3.25), "train_iterator": {"epoch": 5}},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(300)}}, "param_groups": [{"lr": [5e-4]}]},
    }


class Evil:
    """Pickles as a call that would create `marker`: the proof that nothing from a pickle runs."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch_command(marker: Path) -> str:
    return f"touch {marker}"
