"""The weights of an artifact: one safetensors file, every tensor 64-byte aligned in it,
memory-mapped when loaded.

The cpu kernels read weights with aligned vector loads (`codegen/memory.py`), so each
tensor's data must start on a 64-byte boundary of memory. A memory map starts on a page
boundary, so it is enough that each tensor starts on a 64-byte boundary of the file:

- the JSON header is padded with spaces (the format allows it) so that the data section
  starts at a multiple of 64;
- a tensor whose size is not a multiple of 64 bytes is followed by a padding entry
  (`__padding__.<n>`, u8 bytes of zeros): the standard reader refuses holes between
  tensors, and so the file stays readable by `safetensors.safe_open` (padding included).

`map_weights` maps the file copy-on-write (`mmap.ACCESS_COPY`) and returns tensors over
the mapping (`torch.frombuffer`): nothing is read or copied until a kernel touches it, and
a write to a weight in this process never reaches the file.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from ..codegen.memory import KERNEL_ALIGNMENT
from ..errors import ArtifactError

PADDING = "__padding__."  # the name prefix of padding entries
# torch dtype <-> safetensors' spelling
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_HEADER_LENGTH = struct.Struct("<Q")


def _aligned(offset: int) -> int:
    return -(-offset // KERNEL_ALIGNMENT) * KERNEL_ALIGNMENT


def write_weights(path: Path, tensors: dict) -> None:
    """Write `tensors` ({name: tensor}) to `path` as safetensors, each 64-byte aligned."""
    header, layout, offset = {}, [], 0
    for name, tensor in tensors.items():
        if name.startswith(PADDING) or name == "__metadata__":
            raise ArtifactError(f"weight name {name!r} is reserved in an artifact's weights file")
        if tensor.dtype not in DTYPE_NAMES:
            raise ArtifactError(f"weight {name!r} is {tensor.dtype}, which safetensors cannot hold")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        layout.append(tensor)
        padding = _aligned(offset + size) - offset - size
        if padding:
            header[f"{PADDING}{len(layout)}"] = {"dtype": "U8", "shape": [padding],
                                                  "data_offsets": [offset + size, offset + size + padding]}
            layout.append(padding)
        offset += size + padding
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (_aligned(_HEADER_LENGTH.size + len(text)) - _HEADER_LENGTH.size - len(text))
    with open(path, "wb") as file:
        file.write(_HEADER_LENGTH.pack(len(text)) + text)
        for item in layout:
            if isinstance(item, int):
                file.write(bytes(item))
            elif item.numel():
                file.write(memoryview(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def map_weights(path: Path) -> dict:
    """The tensors of a file `write_weights` wrote, over a copy-on-write memory map of it
    (padding entries left out); ArtifactError if the file is not such a file."""
    path = Path(path)
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size < _HEADER_LENGTH.size:
            raise ArtifactError(f"{path}: not a safetensors file ({size} bytes)")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    (length,) = _HEADER_LENGTH.unpack_from(mapped)
    start = _HEADER_LENGTH.size + length
    try:
        header = json.loads(bytes(mapped[_HEADER_LENGTH.size:start]))
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: unreadable safetensors header ({error})") from None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__" or name.startswith(PADDING):
            continue
        tensors[name] = _tensor(path, mapped, start, name, entry)
    return tensors


def _tensor(path: Path, mapped: mmap.mmap, start: int, name: str, entry: dict) -> torch.Tensor:
    dtype, shape, (begin, end) = DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise ArtifactError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which fuselm does not read")
    count = 1
    for dim in shape:
        count *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != count * itemsize or start + end > len(mapped):
        raise ArtifactError(f"{path}: tensor {name!r} ({shape}, {entry['dtype']}) has bytes {begin}..{end} "
                            f"of a data section of {len(mapped) - start}")
    if (start + begin) % KERNEL_ALIGNMENT:
        raise ArtifactError(f"{path}: tensor {name!r} starts at byte {start + begin}, not {KERNEL_ALIGNMENT}-byte "
                            "aligned as the kernels read it")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin).view(shape)
