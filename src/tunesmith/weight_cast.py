"""Cast a loaded model's weights to another dtype without holding the checkpoint and the copy at once.

`from_pretrained(dtype=bf16)` on an fp32 safetensors file (the built-in model, any model saved in fp32) reads every tensor through a memory map and keeps the whole map resident until the last
tensor is read: the process peaks at the file plus its converted copy (a ~0.5B model: 1.9 GB + 0.95 GB). Loading
the file as stored costs nothing up front (the parameters are views of the map), and casting them one at a time
while telling the kernel each source's pages are no longer needed keeps the peak at the copy plus one tensor.
Buffers take the dtype loading in the target dtype would have given them, found on a meta-device skeleton.
The dropped pages are clean pages of a read-only file map, so the kernel refills them from the file if anything
reads them again: nothing is lost, only residency.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os

_MADV_DONTNEED = 4


def file_mapped_ranges(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files whose name ends with `suffix`."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n").endswith(suffix):
                start, end = fields[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _release(start: int, end: int) -> None:
    """Drop this process's resident pages that lie wholly inside [start, end) of a read-only file map."""
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def keeps_dtype_exceptions(model, dtype) -> bool:
    """Whether transformers would keep some of this model's modules in fp32 when loading it in `dtype`
    (`_keep_in_fp32_modules`): then only its own loader knows which, and the caller should use it."""
    import torch

    strict = bool(getattr(model, "_keep_in_fp32_modules_strict", None)) and dtype in (torch.float16, torch.bfloat16)
    loose = bool(getattr(model, "_keep_in_fp32_modules", None)) and dtype == torch.float16
    return strict or loose


def cast_parameters(model, dtype, buffer_dtypes: dict | None = None) -> None:
    """Cast every floating parameter of `model` to `dtype` in place, one tensor at a time, releasing the pages of
    a source that is a view of a memory-mapped safetensors file as soon as its copy exists; then give each buffer
    the dtype `buffer_dtypes` names (what loading in `dtype` would have given it, see `buffer_dtypes_in`)."""
    ranges = file_mapped_ranges() if os.path.exists("/proc/self/maps") else []
    for param in model.parameters():
        if not param.is_floating_point() or param.dtype == dtype:
            continue
        start = param.data_ptr()
        end = start + param.numel() * param.element_size()
        mapped = param.is_contiguous() and any(lo <= start and end <= hi for lo, hi in ranges)
        param.data = param.data.to(dtype)
        if mapped:
            _release(start, end)
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            wanted = (buffer_dtypes or {}).get(f"{module_name}.{name}" if module_name else name, buffer.dtype)
            if buffer.dtype != wanted:
                module._buffers[name] = buffer.to(wanted)
    model.config.dtype = dtype


def buffer_dtypes_in(model, dtype, trust_remote_code: bool = False) -> dict:
    """The dtype of each buffer of `model` had it been built in `dtype`: buffers a model creates itself take the
    default dtype at construction unless its code names one (Gemma's embedding scale does not, rotary frequencies
    do), so the answer comes from building the same model on the meta device, which costs no memory."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    return {name: buffer.dtype for name, buffer in skeleton.named_buffers()}
