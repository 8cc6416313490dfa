"""Where a value holds its samples (graph/passes/batch_layout.py), and what follows from it: blocks meet only
at batch-first values, per-sample Hessian scores at sequence-first layer outputs, and EPTQ through
nn.MultiheadAttention (which works sequence-first inside and failed with an IndexError before)."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig
from eptq_fx.data import CalibSet
from eptq_fx.graph.meta import BATCH_DIM
from eptq_fx.graph.passes.batch_layout import batch_dims
from eptq_fx.graph.passes.block_schedule import plan_blocks
from eptq_fx.graph.passes.qdq_insertion import compare_points
from eptq_fx.method.activation_hessian import label_free_hessian
from eptq_fx.method.block_runner import ensure_batch_layout_
from eptq_fx.numerics.calibration import quant_disabled

N, L, E = 4, 5, 8  # all different, so a dim's size says which it is


class SeqFirst(nn.Module):
    """Samples on dim 1 after the transpose, merged into the rows of (L·N, E) around ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, 3)

    def forward(self, x):
        h = self.a(x.transpose(0, 1))
        r = torch.relu(self.b(h.reshape(-1, E)))
        return self.c(r.reshape(x.shape[1], x.shape[0], E).transpose(0, 1).mean(1))


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(E, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.head(self.mha(h, h, h, need_weights=False)[0].mean(1))


def _values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                values[n.name] = out
            return out

    Record(gm).run(x)
    return values


def _reference_sample_dim(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, int | None]:
    """Independent of shapes at two batch sizes: the dim d of size N such that changing sample j of the input
    changes a value only inside its slice j along d, for every j (None if no dim does)."""
    base = _values(gm, x)
    confined = {name: set(range(v.dim())) for name, v in base.items()}
    for j in range(x.shape[0]):
        x2 = x.clone()
        x2[j] += 1.0
        for name, v in _values(gm, x2).items():
            changed = (v != base[name])
            for d in list(confined[name]):
                outside = changed.movedim(d, 0).clone()
                if v.shape[d] != x.shape[0]:
                    confined[name].discard(d)
                    continue
                outside[j] = False
                if bool(outside.any()):
                    confined[name].discard(d)
    return {name: (min(ds) if len(ds) == 1 else None) for name, ds in confined.items()}


def test_sample_dims_match_which_elements_each_sample_moves() -> None:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(SeqFirst().eval())
    x = torch.randn(N, L, E)
    found, reference = batch_dims(gm, (x,)), _reference_sample_dim(gm, x)
    assert found == reference
    dims = {n.target if n.op == "call_module" else n.name: found[n.name] for n in gm.graph.nodes
            if n.name in found}
    assert (dims["x"], dims["a"], dims["b"], dims["c"]) == (0, 1, None, 0)


def _attn_prepared(config: EPTQConfig):
    torch.manual_seed(0)
    x = torch.randn(32, L, E)
    prepared = eptq_fx.prepare(eptq_fx.capture(Attn().eval(), example_inputs=(x[:4],)), config,
                               example_inputs=(x[:4],))
    eptq_fx.calibrate(prepared, x, config=config)
    return prepared, x


RTN = EPTQConfig(method="rtn", weight_bits=4, act_bits=8, n_calib=32, first_last_8bit=False)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_blocks_meet_only_where_samples_lie_on_dim_0(granularity: str) -> None:
    prepared, x = _attn_prepared(RTN)
    with quant_disabled(prepared):
        reference = _reference_sample_dim(prepared, x[:N])
    assert any(d is None for d in reference.values()) and 1 in reference.values()  # the model has both kinds
    unaware = plan_blocks(prepared, granularity)  # no annotation yet: every value taken to be batch-first
    if granularity == "layer":  # one block per layer cuts inside the attention
        assert any(reference.get(i, 0) != 0 for b in unaware for i in b.inputs)
    ensure_batch_layout_(prepared, CalibSet((x,)))
    assert {n.name: n.meta[BATCH_DIM] for n in prepared.graph.nodes if BATCH_DIM in n.meta} == reference
    blocks = plan_blocks(prepared, granularity)
    crossing = [i for b in blocks for i in b.inputs + b.outputs]
    assert crossing and all(reference.get(name, 0) == 0 for name in crossing)
    assert sorted(q for b in blocks for q in b.quant_ops) == sorted(compare_points(prepared))


def test_per_sample_scores_at_sequence_first_layer_outputs() -> None:
    """Scores of a batch of 8 against the same samples one at a time (exact along the 3 logits): equal where the
    samples have a dim of their own; the batch's mean where they share one (the attention products)."""
    prepared, x = _attn_prepared(RTN)
    calib = CalibSet((x[:16],))
    ensure_batch_layout_(prepared, calib)
    cps = compare_points(prepared)
    dims = {n.name: n.meta[BATCH_DIM] for n in prepared.graph.nodes if n.name in cps}
    assert set(dims.values()) >= {0, 1, None}
    def scores(batch_size: int) -> torch.Tensor:
        hc = HessianConfig(cache_dir=None, max_probes=8, min_probes=2, batch_size=batch_size)
        assert hc.exact_small_outputs  # 3 logits: exact, so the two runs can only differ by the layout
        with quant_disabled(prepared):
            return label_free_hessian(prepared, cps, calib, hc, progress=False).scores

    batched, single = scores(8), scores(1)
    for i, name in enumerate(cps):
        b, s = batched[:, i], single[:, i]
        expected = s if dims[name] is not None else s.view(2, 8).mean(1).repeat_interleave(8)
        torch.testing.assert_close(b, expected, rtol=1e-4, atol=1e-7)


def test_eptq_through_multihead_attention() -> None:
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(64, L, E)
    eptq = EPTQConfig(weight_bits=4, act_bits=8, n_calib=64, first_last_8bit=False,
                      hessian=HessianConfig(cache_dir=None, max_probes=4, min_probes=2),
                      reconstruction=ReconstructionConfig(iters=40, batch_size=16, hessian_scope="all"))
    q = eptq_fx.quantize(model, x, eptq, progress=False)
    assert sum(name.endswith("_weight_int") for name, _ in q.named_buffers()) == 4  # inp, in_proj, out_proj, head
    test = torch.randn(16, L, E)
    with torch.no_grad():
        ref, out = model(test), q(test)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 15.0


def test_sequence_first_model_fed_batch_first_data_is_refused_before_eptq() -> None:
    class SeqFirstAttn(nn.Module):  # nn.MultiheadAttention's default: (L, N, E) in and out
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.head = nn.MultiheadAttention(16, 2), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(0))

    x = torch.randn(64, L, 16)  # the samples on dim 0, as the data API reads them; the model reads dim 1
    config = EPTQConfig(weight_bits=4, act_bits=8, n_calib=64, reconstruction=ReconstructionConfig(iters=5),
                        hessian=HessianConfig(cache_dir=None, max_probes=4, min_probes=2))
    with pytest.raises(eptq_fx.CalibrationDataError, match="does not hold the calibration samples on dim 0"):
        eptq_fx.quantize(SeqFirstAttn().eval(), x, config, progress=False)
