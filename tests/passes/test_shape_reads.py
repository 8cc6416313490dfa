"""LocalizeShapeReads: a batch size read once at the input no longer ties every later layer into one block."""
from __future__ import annotations

import torch
import torch.nn as nn

import eptq_fx
from eptq_fx import EPTQConfig
from eptq_fx.graph.passes.block_schedule import plan_blocks
from eptq_fx.graph.passes.shape_reads import localize_shape_reads_

SYM_SIZE = torch.ops.aten.sym_size.int


class TwoLayers(nn.Module):
    """Two pre-norm-style residual layers; the batch size is read once and used by both layers' reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 8)
        b = x.shape[0]
        h = x + self.l2(torch.relu(self.l1(x))).reshape(b, 4, 8)
        h = h + self.l4(torch.relu(self.l3(h))).reshape(b, 4, 8)
        return h.reshape(b, -1)


def _exported_graph() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    ep = torch.export.export(TwoLayers().eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return ep.module()


def _reads_of_the_input(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is SYM_SIZE and n.args[0].op == "placeholder"]


def test_every_reshape_reads_its_own_input_and_values_stay():
    gm = _exported_graph()
    x = torch.randn(5, 4, 8)
    before = gm(x)
    reads = _reads_of_the_input(gm)
    assert reads and sum(len(r.users) for r in reads) >= 3
    assert localize_shape_reads_(gm) >= 3
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
    # what is left reads the input only where nothing else carries the batch size
    assert not _reads_of_the_input(gm)
    assert localize_shape_reads_(gm) == 0  # idempotent


def test_the_schedule_finds_one_block_per_layer():
    x = torch.randn(3, 4, 8)
    tangled = plan_blocks(_exported_graph())
    prepared = eptq_fx.prepare(_exported_graph(), EPTQConfig(weight_bits=8, act_bits=8, first_last_8bit=False),
                               example_inputs=(x,))
    blocks = plan_blocks(prepared)
    assert len(tangled) == 1
    assert [len(b.quant_ops) for b in blocks] == [2, 2]


def test_a_graph_without_traced_values_is_left_alone():
    gm = torch.fx.symbolic_trace(TwoLayers().eval())
    code = gm.code
    assert localize_shape_reads_(gm) == 0 and gm.code == code
