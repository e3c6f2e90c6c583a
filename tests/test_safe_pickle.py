"""The restricted unpickler: data comes out, nothing from the pickle runs or is imported."""

import argparse
import builtins
import collections
import datetime
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ckpt_fixtures import XTTS_CONFIG_MODULE, Evil, fake_modules, save_legacy, small_state_dict, touch_command
from streammerge.errors import CheckpointError
from streammerge.io import open_checkpoint
from streammerge.io.containers import plain_config, to_jsonable
from streammerge.io.safe_pickle import InertObject, restricted_load


def load(data: bytes):
    return restricted_load(data, "test.pkl")


# --- refusals: the command never runs -------------------------------------------------------------------------

EVIL_CALLS = {
    "os.system": lambda marker: Evil(os.system, touch_command(marker)),
    "subprocess.Popen": lambda marker: Evil(subprocess.Popen, ["touch", str(marker)]),
    "subprocess.call": lambda marker: Evil(subprocess.call, ["touch", str(marker)]),
    "builtins.eval": lambda marker: Evil(builtins.eval, f"open({str(marker)!r}, 'w')"),
    "builtins.exec": lambda marker: Evil(builtins.exec, f"open({str(marker)!r}, 'w')"),
    "builtins.open": lambda marker: Evil(builtins.open, str(marker), "w"),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("call", sorted(EVIL_CALLS))
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, call, legacy):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    obj = {"model": small_state_dict(), "config": {"note": EVIL_CALLS[call](marker)}}
    save_legacy(obj, path) if legacy else torch.save(obj, path)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "nothing from it was executed" in message
    assert call.rpartition(".")[2] in message
    assert not marker.exists()


def test_evil_payload_in_top_level_list_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save([Evil(os.system, touch_command(marker)), small_state_dict()], path)
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("raw, what", [
    (b"cbuiltins\ngetattr\n(cbuiltins\nstr\nS'lower'\ntR.", "builtins.getattr"),
    (b"c__builtin__\neval\n(S'1+1'\ntR.", "builtins.eval"),  # Python 2 names are mapped, then refused
    (b"cposix\nsystem\n.", "posix.system"),  # even naming it without a call
    (b"cimportlib\nimport_module\n(S'os'\ntR.", "importlib.import_module"),
    (b"cshutil\nrmtree\n(S'/nonexistent'\ntR.", "shutil.rmtree"),
    (b"csocket\nsocket\n)R.", "socket.socket"),
    (b"cmytools.helpers\nrun_setup\n(S'x'\ntR.", "mytools.helpers.run_setup"),  # unknown function: never called
    (b"cnumpy.testing._private.utils\nrunstring\n(S'1'\n}tR.", "runstring"),
    (b"ctorch\nload\n(S'/x'\ntR.", "torch.load"),
    (b"ccopyreg\n_reconstructor\n(cposix\nsystem\nc__builtin__\nobject\nNtR.", "posix.system"),
])
def test_crafted_pickles_are_refused(raw, what):
    with pytest.raises(CheckpointError, match=what.replace(".", r"\.")):
        load(raw)


def test_unknown_classes_become_inert_records():
    obj = load(b"cmytools.config\nTrainConfig\n(I1\nS'a'\ntR.")
    assert isinstance(obj, InertObject) and obj.class_name == "mytools.config.TrainConfig"
    assert to_jsonable(obj) == {"__class__": "mytools.config.TrainConfig", "__args__": [1, "a"]}
    assert "mytools" not in sys.modules


def test_global_reference_without_call_is_a_record():
    assert to_jsonable(load(b"cmytools.activations\ngelu\n.")) == {"__global__": "mytools.activations.gelu"}
    assert plain_config(to_jsonable(load(b"cmytools.activations\ngelu\n."))) == "mytools.activations.gelu"


def test_protocol0_object_via_copyreg_reconstructor():
    class Settings:
        def __init__(self):
            self.depth, self.names = 4, ["a", "b"]

    Settings.__module__, Settings.__qualname__ = "oldlib.settings", "Settings"
    with fake_modules("oldlib.settings", Settings=Settings):
        raw = pickle.dumps(Settings(), protocol=0)
    assert b"copy_reg" in raw  # written with Python 2 names
    obj = load(raw)
    assert to_jsonable(obj) == {"__class__": "oldlib.settings.Settings", "depth": 4, "names": ["a", "b"]}


def test_plain_values_round_trip():
    value = {
        "ordered": collections.OrderedDict(a=1, b=2),
        "counter": collections.Counter("aab"),
        "default": collections.defaultdict(list, {"k": [1]}),
        "set": {1, 2}, "frozen": frozenset({3}), "complex": 1 + 2j, "bytes": b"\x00\xffabc",
        "tuple": (1, (2, 3)), "when": datetime.datetime(2026, 11, 24, 10, 0), "delta": datetime.timedelta(1),
        "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "device": torch.device("cpu"),
    }
    for protocol in (0, 2, 4, 5):
        obj = load(pickle.dumps(value, protocol=protocol))
        assert obj["ordered"] == value["ordered"] and isinstance(obj["ordered"], collections.OrderedDict)
        assert obj["counter"] == value["counter"]
        assert obj["default"] == {"k": [1]} and type(obj["default"]) is dict  # the factory is dropped
        assert obj["set"] == {1, 2} and obj["frozen"] == frozenset({3}) and obj["complex"] == 1 + 2j
        assert obj["bytes"] == value["bytes"] and obj["tuple"] == value["tuple"]
        assert obj["when"] == value["when"] and obj["delta"] == value["delta"]
        assert obj["dtype"] is torch.bfloat16 and obj["size"] == (2, 3) and obj["device"] == "cpu"


def test_numpy_values_come_out_as_data():
    value = {"f": np.float64(1.5), "f32": np.float32(0.25), "i": np.int64(7), "b": np.bool_(True),
             "arr": np.arange(6, dtype=np.int32).reshape(2, 3), "big": np.zeros((100, 100), np.float16),
             "structured": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")])}
    obj = load(pickle.dumps(value, protocol=2))
    assert obj["f"] == 1.5 and obj["i"] == 7 and obj["b"] == True  # noqa: E712
    np.testing.assert_array_equal(obj["arr"], value["arr"])
    assert to_jsonable(obj) == {
        "f": 1.5, "f32": 0.25, "i": 7, "b": True, "arr": [[0, 1, 2], [3, 4, 5]],
        "big": {"__class__": "numpy.ndarray", "shape": [100, 100], "dtype": "float16"},
        "structured": {"__class__": "numpy.ndarray", "shape": [2], "dtype": "[('a', '<i4'), ('b', '<f8')]"},
    }


def test_numpy_object_arrays_keep_unknown_objects_inert():
    raw = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
           b"(K\x01K\x01\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87R(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff"
           b"\xff\xffJ\xff\xff\xff\xffK?tb\x89]cmytools\nThing\n)\x81atb.")
    arr = load(raw)
    assert arr.shape == (1,) and isinstance(arr[0], InertObject) and arr[0].class_name == "mytools.Thing"


def test_argparse_namespace_is_a_dict():
    obj = load(pickle.dumps({"args": argparse.Namespace(arch="transformer", lr=[5e-4])}, protocol=2))
    record = to_jsonable(obj)["args"]
    assert record == {"__class__": "argparse.Namespace", "arch": "transformer", "lr": [5e-4]}
    assert plain_config(record) == {"arch": "transformer", "lr": [5e-4]}


def test_omegaconf_like_config_becomes_its_content():
    """OmegaConf pickles DictConfig/ListConfig with `_content` of nodes holding `_val`, and `_parent` cycles."""
    def cls(module, name):
        c = type(name, (), {})
        c.__module__, c.__qualname__ = module, name
        return c

    DictConfig, ListConfig = cls("omegaconf.dictconfig", "DictConfig"), cls("omegaconf.listconfig", "ListConfig")
    AnyNode, Meta = cls("omegaconf.nodes", "AnyNode"), cls("omegaconf.base", "ContainerMetadata")
    root, langs = DictConfig(), ListConfig()
    node = AnyNode()
    node.__dict__.update(_val=0.5, _parent=root, _metadata=Meta())
    langs.__dict__.update(_content=["en", "de"], _parent=root, _metadata=Meta())
    root.__dict__.update(_content={"lr": node, "langs": langs}, _parent=None, _metadata=Meta())
    with fake_modules("omegaconf.dictconfig", DictConfig=DictConfig), \
            fake_modules("omegaconf.listconfig", ListConfig=ListConfig), \
            fake_modules("omegaconf.nodes", AnyNode=AnyNode), fake_modules("omegaconf.base", ContainerMetadata=Meta):
        raw = pickle.dumps({"cfg": root}, protocol=2)
    record = to_jsonable(load(raw))["cfg"]
    assert record == {"__class__": "omegaconf.dictconfig.DictConfig", "lr": 0.5,
                      "langs": {"__class__": "omegaconf.listconfig.ListConfig", "__list__": ["en", "de"]}}
    assert plain_config(record) == {"lr": 0.5, "langs": ["en", "de"]}


def test_dict_and_list_subclasses_keep_their_items():
    class AttrDict(dict):
        pass

    class Names(list):
        pass

    for c, name in ((AttrDict, "AttrDict"), (Names, "Names")):
        c.__module__, c.__qualname__ = "mylib.util", name
    with fake_modules("mylib.util", AttrDict=AttrDict, Names=Names):
        raw = pickle.dumps({"hp": AttrDict(lr=0.1, depth=3), "names": Names(["a", "b"])}, protocol=2)
    out = to_jsonable(load(raw))
    assert out["hp"]["__items__"] == {"lr": 0.1, "depth": 3}
    assert plain_config(out) == {"hp": {"lr": 0.1, "depth": 3}, "names": ["a", "b"]}


def test_enum_and_path_records_become_their_values():
    import enum
    import pathlib

    class Mode(enum.Enum):
        FAST = "fast"

    Mode.__module__, Mode.__qualname__ = "mylib.modes", "Mode"
    with fake_modules("mylib.modes", Mode=Mode):
        raw = pickle.dumps({"mode": Mode.FAST, "out": pathlib.PurePosixPath("/runs/a")}, protocol=2)
    assert plain_config(to_jsonable(load(raw))) == {"mode": "fast", "out": "/runs/a"}


def test_xtts_config_module_is_never_imported(tmp_path, monkeypatch):
    from ckpt_fixtures import save_xtts_trainer

    marker = tmp_path / "setstate-ran"
    monkeypatch.setenv("STREAMMERGE_TEST_MARKER", str(marker))
    path = save_xtts_trainer(tmp_path / "model.pth", small_state_dict(prefix="xtts."))
    assert XTTS_CONFIG_MODULE not in sys.modules
    with open_checkpoint(path) as ckpt:
        assert ckpt.metadata["config"]["__class__"] == f"{XTTS_CONFIG_MODULE}.XttsConfig"
    assert XTTS_CONFIG_MODULE not in sys.modules and "TTS" not in sys.modules
    assert not marker.exists()


def test_corrupt_pickle_is_a_checkpoint_error():
    raw = pickle.dumps({"a": [1, 2, 3]}, protocol=2)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(raw[:-5])
