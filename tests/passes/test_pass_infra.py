"""The passes as torch.fx.passes.infra passes: alone, in a PassManager with a user's own pass, and checked."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import eptq_fx
from eptq_fx import EPTQConfig
from eptq_fx.errors import ModelError
from eptq_fx.graph.meta import LAYER_QUANT, LayerQuant
from eptq_fx.graph.passes.infra import (
    Annotate,
    FoldBatchNorm,
    InsertQDQ,
    ModularizeWeightOps,
    check_graph,
    prepare_pass_manager,
)
from eptq_fx.numerics.calibration import quant_disabled
from examples.models import example_input, make_model

CONFIG = EPTQConfig(method="rtn", weight_bits=8, act_bits=8)


def _bn_count(gm: fx.GraphModule) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


def test_fold_batchnorm_runs_alone_and_reports_what_it_did() -> None:
    model = make_model("tiny_resnet")
    gm = fx.symbolic_trace(model)
    result = FoldBatchNorm()(gm)
    assert isinstance(result, PassResult) and result.modified
    assert _bn_count(result.graph_module) == 0 and _bn_count(model) > 0  # the user's model keeps its BNs
    x = example_input("tiny_resnet", 4)
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-5)
    assert not FoldBatchNorm()(result.graph_module).modified  # nothing left to fold


def test_a_custom_pipeline_with_a_users_pass_matches_prepare() -> None:
    seen = []

    def count_nodes(gm: fx.GraphModule) -> PassResult:  # a user's own pass, run between ours
        seen.append(len(gm.graph.nodes))
        return PassResult(gm, False)

    model = make_model("tiny_resnet")
    pm = PassManager([ModularizeWeightOps(), FoldBatchNorm(), count_nodes, Annotate(CONFIG), InsertQDQ()],
                     run_checks_after_each_pass=True)
    pm.add_checks(check_graph)
    custom = pm(fx.symbolic_trace(model)).graph_module
    standard = prepare_pass_manager(CONFIG)(eptq_fx.capture(model)).graph_module
    assert seen and [n.op for n in custom.graph.nodes] == [n.op for n in standard.graph.nodes]
    x = example_input("tiny_resnet", 4)
    with torch.no_grad(), quant_disabled(custom):
        torch.testing.assert_close(custom(x), model(x), rtol=1e-4, atol=1e-5)


def test_check_graph_catches_a_broken_meta_invariant() -> None:
    gm = fx.symbolic_trace(make_model("tiny_resnet"))
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    add.meta[LAYER_QUANT] = LayerQuant("add", 8, 8)  # a layer annotation on a non-weight op
    with pytest.raises(ModelError, match="no weight op or matmul"):
        check_graph(gm)
