"""Save and load: pickling GraphModules, and eptq_fx.save / eptq_fx.load (weights_only, atomic, checked)."""
from __future__ import annotations

import os

import pytest
import torch

import eptq_fx
from eptq_fx import ArtifactError, EPTQConfig
from examples.models import example_input, make_model

CONFIG = EPTQConfig(method="rtn", weight_bits=4, act_bits=4, act_range="minmax")


@pytest.fixture(scope="module")
def quantized():
    model = make_model("tiny_resnet")
    q = eptq_fx.quantize(model, example_input("tiny_resnet", 64, seed=1), CONFIG, progress=False)
    return model, q, example_input("tiny_resnet", 7, seed=2)


@pytest.mark.parametrize("stage", ["capture", "prepare", "quantize"])
def test_torch_save_and_load_give_identical_outputs(quantized, stage, tmp_path):
    model, q, x = quantized
    gm = {"capture": lambda: eptq_fx.capture(model), "prepare": lambda: eptq_fx.prepare(model),
          "quantize": lambda: q}[stage]()
    torch.save(gm, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


def test_eptq_save_loads_with_weights_only_and_matches(quantized, tmp_path):
    _, q, x = quantized
    path = eptq_fx.save(q, tmp_path / "model.eptq")
    raw = torch.load(path, weights_only=True)  # plain data: no pickled code
    assert raw["config"]["weight_bits"] == 4 and raw["config"]["act_bits"] == 4
    tables = raw["weights"]
    assert tables and all(t["int_weight"].dtype == torch.int8 for t in tables.values())
    # the tables hold the integers the graph computes with
    name, t = next(iter(tables.items()))
    torch.testing.assert_close(t["int_weight"], q.get_buffer(name), rtol=0, atol=0)
    # 4-bit layers, and the first and last at 8 bits (first_last_8bit)
    assert {(t["qmin"], t["qmax"]) for t in tables.values()} == {(-8, 7), (-128, 127)}
    assert {(a["qmin"], a["qmax"]) for a in raw["activations"].values()} >= {(0, 15)}
    loaded = eptq_fx.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name != "model.eptq"]  # no temporary file left behind


def test_load_refuses_damaged_and_foreign_files(quantized, tmp_path):
    _, q, _ = quantized
    path = eptq_fx.save(q, tmp_path / "model.eptq")
    data = bytearray(path.read_bytes())
    truncated = tmp_path / "truncated.eptq"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable"):
        eptq_fx.load(truncated)
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["weights"]))
    payload["weights"][name]["int_weight"][0].zero_()  # a flipped weight: still loads, but the checksum differs
    torch.save(payload, tmp_path / "tampered.eptq")
    with pytest.raises(ArtifactError, match="damaged"):
        eptq_fx.load(tmp_path / "tampered.eptq")
    torch.save(q.state_dict(), tmp_path / "state_dict.pt")
    with pytest.raises(ArtifactError, match="not written by eptq_fx.save"):
        eptq_fx.load(tmp_path / "state_dict.pt")
    torch.save(q, tmp_path / "pickled.pt")  # a whole pickled module: refused by weights_only, not executed
    with pytest.raises(ArtifactError, match="not a readable"):
        eptq_fx.load(tmp_path / "pickled.pt")


def test_a_failed_save_leaves_the_old_file(quantized, tmp_path, monkeypatch):
    _, q, _ = quantized
    path = eptq_fx.save(q, tmp_path / "model.eptq")
    before = path.read_bytes()

    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        if not isinstance(f, (str, os.PathLike)):  # torch.export's in-memory use
            return real_save(obj, f, *a, **k)
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        eptq_fx.save(q, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.eptq"]


def test_exported_program_holds_no_calibration_data(quantized, tmp_path):
    _, q, x = quantized
    big = torch.randn(4096, *x.shape[1:])  # 50 MB of "calibration data"
    path = tmp_path / "m.pt2"
    eptq_fx.export.export(q, (big[:2],), path)
    assert path.stat().st_size < 2_000_000
