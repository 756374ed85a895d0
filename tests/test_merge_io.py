"""The streaming safetensors reader and sharded writer, checked against the safetensors library."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.merging.io import (
    INDEX_FILE,
    ModelWeights,
    PlannedTensor,
    SafetensorsFile,
    ShardedWriter,
    plan_shards,
    save_streaming,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 3, generator=g),
        "b.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
    }


def test_written_file_reads_back_with_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    assert save_streaming(tmp_path, tensors) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0  # data starts 8-byte aligned
    assert json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}


def test_reader_reads_files_written_by_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt"}
    assert set(f.names()) == set(tensors)
    for k, v in tensors.items():
        got = f.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_sharded_output_has_numbered_files_and_an_index(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    files = save_streaming(tmp_path, tensors, max_shard_size=900)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 2000
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[1], "t4": files[2]}
    weights = ModelWeights(tmp_path)
    assert weights.names() == list(tensors)
    for k, v in tensors.items():
        assert torch.equal(weights.read(k), v)
        assert torch.equal(load_file(tmp_path / index["weight_map"][k])[k], v)


def test_plan_gives_an_oversized_tensor_its_own_shard():
    plan = [PlannedTensor("a", torch.float32, (10,)), PlannedTensor("big", torch.float32, (100,)),
            PlannedTensor("c", torch.float32, (10,))]
    assert [[t.name for t in s] for s in plan_shards(plan, 100)] == [["a"], ["big"], ["c"]]


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    plan = [PlannedTensor("a", torch.float32, (2,)), PlannedTensor("b", torch.float32, (2,))]
    w = ShardedWriter(tmp_path, plan)
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(2))
    w = ShardedWriter(tmp_path, plan)
    with pytest.raises(RuntimeError, match="planned"):
        w.write("a", torch.zeros(3))
    w = ShardedWriter(tmp_path, plan)
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_max_shard_size_counts_kb_in_thousands_and_kib_in_1024s(tmp_path):
    """tunesmith.sizes' convention at the writer: three 340-byte tensors (1020 bytes) fit one KiB, not one KB."""
    tensors = {f"t{i}": torch.zeros(85) for i in range(3)}
    assert save_streaming(tmp_path / "kib", tensors, max_shard_size="1KiB") == ["model.safetensors"]
    assert len(save_streaming(tmp_path / "kb", tensors, max_shard_size="1KB")) == 2
    assert save_streaming(tmp_path / "bytes", tensors, max_shard_size=1020) == ["model.safetensors"]
    assert len(save_streaming(tmp_path / "fewer", tensors, max_shard_size="1019")) == 2  # no unit: bytes
    with pytest.raises(ValueError, match="not a size"):
        save_streaming(tmp_path / "bad", tensors, max_shard_size="big")


def test_model_folder_without_safetensors_is_refused_without_unpickling(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(TunesmithError, match="never unpickles"):
        ModelWeights(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(TunesmithError, match="missing"):
        ModelWeights(tmp_path)


def test_truncated_file_is_reported(tmp_path):
    save_streaming(tmp_path, {"a": torch.zeros(1000)})
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TunesmithError, match="truncated"):
        SafetensorsFile(path).read("a")
    path.write_bytes(b"xx")
    with pytest.raises(TunesmithError, match="not a safetensors file"):
        SafetensorsFile(path)
