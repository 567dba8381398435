"""Read one checkpoint file into a flat ``{name: tensor}`` dict, safely, or fail with a plain reason.

This is the first stage of loading official Stable Diffusion weights
(``v1-5-pruned-emaonly.safetensors``, ``sd-v1-4.ckpt``, diffusers ``diffusion_pytorch_model.bin``, ...).
It only turns bytes into tensors; mapping names onto our modules happens elsewhere.

Why care about safety: ``.ckpt``/``.bin``/``.pt`` files are Python pickles, and unpickling can call
any function the file names (``os.system``, ``exec``...). So:

* the format is told from the file's first bytes, never from its name, so a pickle renamed to
  ``.safetensors`` still goes through the guarded path;
* safetensors files are plain JSON header + raw bytes and are read with the ``safetensors`` library;
* pickles are opened only with ``torch.load(weights_only=True)``, whose unpickler builds tensors and
  containers and refuses every other global; the one class official SD ``.ckpt`` files name
  (a PyTorch Lightning callback) is replaced by an empty stand-in for the duration of the load, and
  an ``nn.ParameterDict`` (old AUTOMATIC1111 embeddings pickle one) is read as the plain dict of its
  tensors, no module built.

Every failure is a ``CheckpointError`` whose message names the file and the cause in one sentence.
"""

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# Classes that official checkpoints name but that we neither have nor need.
# sd-v1-*.ckpt were saved by PyTorch Lightning, whose checkpoint dict holds
# {"callbacks": {ModelCheckpoint: {...}}}: the callback *class* itself is a dict key.
STUBBED_CLASSES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)

_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# Old torch.save (before the zip format) first pickles this number with opcode LONG1 (b"\x8a", 10 bytes).
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MIN_SIZE = 10  # the smallest possible checkpoint: a safetensors file, 8-byte length + "{}"


class CheckpointError(ValueError):
    """A checkpoint file could not be read; the message names the file and why."""


@dataclass(frozen=True)
class CheckpointContents:
    """What one file held: its tensors, the names of top-level entries that were not tensors
    (``epoch``, ``global_step``, ``callbacks``...), and the sniffed format."""

    tensors: dict[str, torch.Tensor]
    ignored_entries: list[str]
    format: str


def _error(path: Path, cause: str) -> CheckpointError:
    return CheckpointError(f"{path}: {cause}")


def sniff_format(path: str | Path) -> str:
    """Return "safetensors", "torch-zip" or "torch-legacy-pickle", judged by the first bytes.

    Files that are recognisably not checkpoints (LFS pointer, HTML page, empty...) raise CheckpointError.
    """
    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file")
    if path.is_dir():
        raise _error(path, "is a directory, not a checkpoint file (pass the weights file inside it)")
    size = path.stat().st_size
    if size == 0:
        raise _error(path, "is empty (0 bytes), so the download or copy probably failed")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_LFS_POINTER):
        raise _error(path, "is a git-lfs pointer file, not the weights; run `git lfs pull` to fetch them")
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<!doctype", b"<html")):
        raise _error(path, "is an HTML page, not a checkpoint (a failed or redirected download?)")
    if size < _MIN_SIZE:
        raise _error(path, f"is only {size} bytes, too short to be any checkpoint")
    # Safetensors first: its 8-byte header length can begin with any byte, even b"\x80".
    if head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80":  # pickle PROTO opcode
        if _LEGACY_MAGIC in head[:32]:
            return "torch-legacy-pickle"
        raise _error(path, "is a plain Python pickle, not a torch.save checkpoint, so it was not unpickled")
    raise _error(path, f"is not a known checkpoint format (it starts with {head[:8]!r})")


def _check_safetensors_layout(path: Path) -> None:
    """Check the header against the file size, so truncation is reported as such."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if 8 + header_len > size:
            raise _error(path, f"is truncated or corrupt: its header claims {header_len} bytes "
                               f"but the file has only {size}")
        try:
            header = json.loads(f.read(header_len))
            data_end = max((entry["data_offsets"][1] for name, entry in header.items()
                            if name != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise _error(path, "is corrupt: its safetensors header is not the expected JSON") from None
    if 8 + header_len + data_end > size:
        raise _error(path, f"is truncated or corrupt: its tensor data should end at byte "
                           f"{8 + header_len + data_end} but the file has only {size}")


def _refusal_reason(message: str) -> str:
    """Pull the offending global's name out of torch's weights-only error message."""
    match = re.search(r"GLOBAL (\S+)", message)
    if match is None:
        return "its pickle was refused by torch's weights-only unpickler, so it was not loaded"
    name = match.group(1)
    if "." not in name:  # torch prints builtins.exec as plain "exec"
        name = f"builtins.{name}"
    return f"its pickle references `{name}` which is not allowed, so it was not loaded"


def _stub(qualified_name: str) -> tuple[type, str]:
    module, _, name = qualified_name.rpartition(".")
    stand_in = type(name, (), {"__module__": module, "__doc__": "Empty stand-in; see STUBBED_CLASSES."})
    return stand_in, qualified_name


class _ParameterDictContents(dict):
    """What a pickled ``torch.nn.ParameterDict`` is read as: ``{name: tensor}``, its parameters as
    plain tensors. The module's pickled state (its ``_parameters``, empty hook tables...) was built by
    the weights-only unpickler like any other container; only ``_parameters`` is kept."""

    def __setstate__(self, state: dict) -> None:
        self.update((name, p.detach()) for name, p in state.get("_parameters", {}).items())


# Containers some files pickle whole, read as plain data instead of the class they name.
READ_AS_PLAIN = ((_ParameterDictContents, "torch.nn.modules.container.ParameterDict"),)

_STUBS = [_stub(name) for name in STUBBED_CLASSES] + list(READ_AS_PLAIN)


def _torch_load(path: Path, fmt: str) -> object:
    # torch.load sends any path ending ".safetensors" to the safetensors reader by name alone, so a
    # pickle named that way is handed over as an open file. Other files go by path, which lets torch
    # mmap a zip's tensor data instead of reading it all into memory (the legacy format cannot be mapped).
    by_name_as_safetensors = str(path).endswith(".safetensors")
    try:
        with open(path, "rb") as f, torch.serialization.safe_globals(_STUBS):
            return torch.load(f if by_name_as_safetensors else path, map_location="cpu", weights_only=True,
                              mmap=fmt == "torch-zip" and not by_name_as_safetensors)
    except pickle.UnpicklingError as err:
        raise _error(path, _refusal_reason(str(err))) from err
    except (RuntimeError, EOFError) as err:
        detail = str(err).split(". ")[0] or type(err).__name__
        raise _error(path, f"is truncated or corrupt (torch says: {detail})") from err


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Read one file and return its tensors, the names of dropped non-tensor entries, and its format."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        _check_safetensors_layout(path)
        try:
            return CheckpointContents(load_file(path, device="cpu"), [], fmt)
        except SafetensorError as err:
            raise _error(path, f"is corrupt ({err})") from err

    obj = _torch_load(path, fmt)
    # Lightning checkpoints keep the weights under "state_dict". "model"/"module" wrappers
    # (DeepSpeed, some training scripts) are not used by the SD v1 files, so they are not unwrapped.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        outer_ignored = [str(k) for k in obj if k != "state_dict"]
        obj = obj["state_dict"]
    else:
        outer_ignored = []
    if not isinstance(obj, dict):
        raise _error(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    ignored = outer_ignored + [str(k) for k in obj if k not in tensors]
    return CheckpointContents(tensors, ignored, fmt)


def read_object(path: str | Path) -> object:
    """What one file holds, nested containers kept (an A1111 embedding's {"string_to_param": {...}}),
    read as safely as `read_checkpoint`: safetensors as a dict of tensors, pickles weights-only."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return read_checkpoint(path).tensors
    return _torch_load(path, fmt)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read one checkpoint file into a flat ``{name: tensor}`` dict (non-tensor entries dropped)."""
    return read_checkpoint(path).tensors


def read_sharded(index_json_path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``*.safetensors.index.json`` / ``pytorch_model.bin.index.json`` and all its shards,
    which must sit in the same folder, into one flat dict."""
    index_path = Path(index_json_path)
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except OSError as err:
        raise _error(index_path, f"could not be read ({err.strerror})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _error(index_path, "is not a shard index (JSON with a \"weight_map\")") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard_name in sorted(set(weight_map.values())):
        if Path(shard_name).name != shard_name:
            raise _error(index_path, f"names shard `{shard_name}`, which is not a file in the same folder")
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise _error(index_path, f"names shard `{shard_name}`, which is missing from {index_path.parent}")
        tensors.update(read_state_dict(shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise _error(index_path, f"lists {len(missing)} tensors its shards lack, e.g. `{missing[0]}`")
    return tensors
