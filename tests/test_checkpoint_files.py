"""Reading one checkpoint file: every format SD ships in loads, and every bad file fails in words.

All files are made in tmp_path. A file's format is judged by its bytes, never its name, and a pickle
that tries to run code is refused before anything runs.
"""
import builtins
import json
import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from sd_scratch.checkpoints.files import (
    CheckpointError,
    read_checkpoint,
    read_object,
    read_sharded,
    read_state_dict,
    sniff_format,
)


def small_state_dict() -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8),
        "first_stage_model.quant_conv.weight": torch.randn(8, 8, 1, 1, dtype=torch.float16),
    }


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


# ---- formats that load --------------------------------------------------------------------------

def test_safetensors_round_trip(tmp_path):
    weights = small_state_dict()
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(weights, path)
    contents = read_checkpoint(path)
    assert contents.format == "safetensors"
    assert_same(contents.tensors, weights)


def test_torch_zip_round_trip(tmp_path):
    weights = small_state_dict()
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(weights, path)
    assert sniff_format(path) == "torch-zip"
    assert_same(read_state_dict(path), weights)


def test_legacy_torch_pickle_round_trip(tmp_path):
    weights = small_state_dict()
    path = tmp_path / "old.pt"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "torch-legacy-pickle"
    assert_same(read_state_dict(path), weights)


def test_lightning_ckpt_with_modelcheckpoint_callback_loads(tmp_path, monkeypatch):
    """sd-v1-4.ckpt keys its callback state by the Lightning class itself; we load it without Lightning."""
    weights = small_state_dict()
    path = tmp_path / "sd-v1-4.ckpt"
    allowed_before = set(torch.serialization.get_safe_globals())
    with monkeypatch.context() as m:
        fake = {name: types.ModuleType(name) for name in
                ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")}
        ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
        fake["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
        for name, module in fake.items():
            m.setitem(sys.modules, name, module)
        torch.save({
            "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "state_dict": weights,
            "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": torch.tensor(0.0)}},
            "optimizer_states": [], "lr_schedulers": [],
        }, path)
    assert "pytorch_lightning" not in sys.modules

    contents = read_checkpoint(path)
    assert_same(contents.tensors, weights)
    assert set(contents.ignored_entries) == {"epoch", "global_step", "pytorch-lightning_version",
                                             "callbacks", "optimizer_states", "lr_schedulers"}
    assert set(torch.serialization.get_safe_globals()) == allowed_before  # the stand-in was scoped to the load


def test_format_is_sniffed_from_bytes_not_name(tmp_path):
    weights = small_state_dict()
    path = tmp_path / "model.ckpt"
    save_file(weights, path)
    assert sniff_format(path) == "safetensors"
    assert_same(read_state_dict(path), weights)


def test_a_pickled_parameter_dict_is_read_as_a_dict_of_plain_tensors(tmp_path):
    vectors = torch.randn(2, 32)
    path = tmp_path / "old-embedding.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())}), "step": 7},
               path)  # zip format: torch's older one also pickles a module's source code, refused as code
    obj = read_object(path)
    assert obj["step"] == 7 and list(obj["string_to_param"]) == ["*"]
    tensor = obj["string_to_param"]["*"]
    assert type(tensor) is torch.Tensor and not tensor.requires_grad
    assert torch.equal(tensor, vectors)


# ---- pickles that try to run code -----------------------------------------------------------------

class RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("file_name", ["evil.ckpt", "evil.safetensors", "evil.bin"])
@pytest.mark.parametrize("payload, global_name", [
    (RunsShellCommand, f"{os.system.__module__}.system"),  # posix.system on Linux and macOS
    (RunsPython, "builtins.exec"),
])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, file_name, payload, global_name, zip_format):
    marker = tmp_path / "payload_ran"
    path = tmp_path / file_name
    torch.save({"weight": torch.zeros(2), "x": payload(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert file_name in message
    assert f"references `{global_name}` which is not allowed" in message
    assert not marker.exists()


def test_a_parameter_dict_carrying_a_payload_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 4))})
    params.smuggled = RunsShellCommand(marker)  # pickled with the module's state
    path = tmp_path / "style.pt"
    torch.save({"string_to_param": params}, path)
    with pytest.raises(CheckpointError, match=r"style\.pt.*not allowed"):
        read_object(path)
    assert not marker.exists()


def test_plain_pickle_is_not_unpickled_at_all(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": RunsPython(marker)}))
    with pytest.raises(CheckpointError, match=r"evil\.safetensors.*plain Python pickle.*not unpickled"):
        read_state_dict(path)
    assert not marker.exists()


# ---- broken and non-checkpoint files ------------------------------------------------------------

def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(small_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        read_state_dict(path)


def test_safetensors_header_longer_than_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(small_state_dict(), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt.*header claims"):
        read_state_dict(path)


def test_safetensors_with_broken_json_header(tmp_path):
    header = b'{"a": {"dtype": "F32", '
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*corrupt.*header is not the expected JSON"):
        read_state_dict(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_torch_file(tmp_path, zip_format):
    path = tmp_path / "cut.ckpt"
    torch.save(small_state_dict(), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated or corrupt"):
        read_state_dict(path)


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa\n"
                    "size 4265146304\n")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "v1-5-pruned-emaonly.safetensors" in message
    assert "git-lfs pointer" in message and "not the weights" in message and "git lfs pull" in message


def test_html_page(tmp_path):
    path = tmp_path / "sd-v1-4.ckpt"
    path.write_text("\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    with pytest.raises(CheckpointError, match=r"sd-v1-4\.ckpt.*HTML page"):
        read_state_dict(path)


def test_empty_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.touch()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*empty"):
        read_state_dict(path)


def test_file_too_short(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match=r"model\.bin.*4 bytes, too short"):
        read_state_dict(path)


def test_unknown_format(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(CheckpointError, match=r"model\.bin.*not a known checkpoint format"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.safetensors.*no such file"):
        read_state_dict(tmp_path / "nowhere.safetensors")


def test_directory(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"unet.*is a directory"):
        read_state_dict(folder)


# ---- sharded checkpoints ------------------------------------------------------------------------

def write_shards(folder) -> dict[str, torch.Tensor]:
    weights = small_state_dict()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, folder / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weights


def test_sharded_round_trip(tmp_path):
    weights = write_shards(tmp_path)
    assert_same(read_sharded(tmp_path / "model.safetensors.index.json"), weights)


def test_sharded_with_missing_shard(tmp_path):
    write_shards(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-00002.*missing"):
        read_sharded(tmp_path / "model.safetensors.index.json")
