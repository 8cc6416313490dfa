"""The Hessian stage feeds reconstruction, and the network-output fallback keeps EPTQ from ending below RTN."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import eptq_fx
from eptq_fx import EPTQConfig, HessianConfig, ReconstructionConfig
from eptq_fx.data import CalibSet
from eptq_fx.errors import ConfigError
from eptq_fx.graph.meta import BLOCKS, HESSIAN_MEAN
from eptq_fx.graph.passes.block_schedule import plan_blocks, schedule_blocks
from eptq_fx.graph.passes.qdq_insertion import weight_ops
from eptq_fx.method import reconstruction as R
from eptq_fx.method.fallback import restore_rtn_, snapshot_rtn
from eptq_fx.method.hessian_stage import HessianEstimate, estimate_hessian
from eptq_fx.numerics.calibration import calibrate, quant_disabled
from examples.models import example_input, make_model, randomize_batchnorm_

CFG = EPTQConfig(weight_bits=4, act_bits=4, first_last_8bit=False, n_calib=128, seed=0,
                 hessian=HessianConfig(max_probes=8, min_probes=4, cache_dir=None),
                 reconstruction=ReconstructionConfig(iters=30, batch_size=16, hessian_weighting=True,
                                                     hessian_per_channel=False, hessian_scope="all"))


def _calibrated(model, x, cfg):
    prepared = eptq_fx.prepare(model, cfg, example_inputs=(x[:2],))
    calibrate(prepared, CalibSet((x,)), config=cfg, progress=False)
    return prepared


def test_given_estimate_is_what_reconstruction_uses():
    model, x = make_model("small_cnn"), example_input("small_cnn", batch_size=128, seed=5)
    a = _calibrated(model, x, CFG)
    est = estimate_hessian(a, CalibSet((x,)), CFG, progress=False)
    assert est.activation is not None and est.weight is None
    R.reconstruct(a, CalibSet((x,)), CFG, progress=False, hessian=est)
    b = _calibrated(model, x, CFG)
    R.reconstruct(b, CalibSet((x,)), CFG, progress=False)  # computes the same estimate itself
    c = _calibrated(model, x, CFG)
    # a different estimate (uniform) must change the solution: the argument is really consumed
    R.reconstruct(c, CalibSet((x,)), CFG, progress=False, hessian=HessianEstimate(None, None))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))


def test_uniform_loss_still_scores_the_layers_for_the_report():
    """hessian_weighting=False (the default's loss where no BatchNorm stays in the graph): the stage still scores
    the compare points (report, sensitivity),
    the loss ignores them (the given estimate and a score-free one give the same result), and
    report_scores=False skips the stage."""
    cfg = dataclasses.replace(CFG, reconstruction=dataclasses.replace(CFG.reconstruction, hessian_weighting=False))
    model, x = make_model("small_cnn"), example_input("small_cnn", batch_size=128, seed=5)
    a = _calibrated(model, x, cfg)
    est = estimate_hessian(a, CalibSet((x,)), cfg, progress=False)
    assert est.activation is not None and not est.weighs and est.block_outputs is None
    assert bool((est.scores(128, len(est.activation.names)) == 1).all())
    R.reconstruct(a, CalibSet((x,)), cfg, progress=False, hessian=est)
    assert set(a.meta[HESSIAN_MEAN]) == set(est.activation.names)
    b = _calibrated(model, x, cfg)
    R.reconstruct(b, CalibSet((x,)), cfg, progress=False, hessian=HessianEstimate(None, None))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    skip = dataclasses.replace(cfg, hessian=dataclasses.replace(cfg.hessian, report_scores=False))
    assert estimate_hessian(_calibrated(model, x, skip), CalibSet((x,)), skip, progress=False).activation is None


def test_report_only_scores_use_a_sample_subset_and_few_probes():
    """With uniform loss weights the scores only rank the layers: they come from ``report_samples`` samples
    with at most ``report_probes`` probes each, and rank the layers as the full estimate (every sample,
    exact traces of the 10 logits) does."""
    model, x = make_model("small_cnn"), example_input("small_cnn", batch_size=128, seed=5)
    hc = HessianConfig(max_probes=100, min_probes=10, cache_dir=None, report_samples=48, report_probes=10)
    uniform = dataclasses.replace(CFG, hessian=hc,
                                  reconstruction=dataclasses.replace(CFG.reconstruction, hessian_weighting=False))
    weighted = dataclasses.replace(uniform, reconstruction=CFG.reconstruction)
    a = _calibrated(model, x, uniform)
    ranking = estimate_hessian(a, CalibSet((x,)), uniform, progress=False).activation
    full = estimate_hessian(a, CalibSet((x,)), weighted, progress=False).activation
    assert ranking.scores.shape == (48, full.scores.shape[1]) and full.scores.shape[0] == 128
    assert ranking.n_probes <= 10
    order = lambda t: torch.argsort(t.scores.mean(0)).tolist()  # noqa: E731
    assert order(ranking) == order(full)
    torch.testing.assert_close(ranking.scores.mean(0), full.scores.mean(0), rtol=0.25, atol=0)


def test_hmse_weight_hessian_comes_from_the_stage():
    cfg = dataclasses.replace(CFG, weight_range="hmse")
    model, x = make_model("small_cnn"), example_input("small_cnn", batch_size=64, seed=5)
    prepared = _calibrated(model, x, cfg)
    est = estimate_hessian(prepared, CalibSet((x,)), cfg, progress=False)
    ops = weight_ops(prepared)
    assert est.weight is not None and set(est.weight) == set(ops)
    assert all(est.weight[n].shape == op.weight.shape and float(est.weight[n].sum()) > 0 for n, op in ops.items())


def test_network_fallback_restores_round_to_nearest_exactly(monkeypatch, caplog):
    """A block that 'improves' its local loss but wrecks the network must not survive: the result is then
    bit-identical to a method="rtn" run."""
    model, x = make_model("tiny_resnet"), example_input("tiny_resnet", batch_size=128, seed=3)

    def wrecking_train(sub, block, parts, *args, **kwargs):
        for op in parts.weight_ops.values():
            with torch.no_grad():
                op.op.bias.add_(5.0)
        return 1.0, 0.5, 20.0  # claims a local improvement (and an SQNR), so the per-block test keeps it

    monkeypatch.setattr(R, "_train_block", wrecking_train)
    prepared = _calibrated(model, x, CFG)
    with caplog.at_level(logging.WARNING, logger=R.__name__):
        R.reconstruct(prepared, CalibSet((x,)), CFG, progress=False)
    assert "kept round-to-nearest" in caplog.text
    rtn = eptq_fx.quantize(model, x, dataclasses.replace(CFG, method="rtn"), progress=False)
    x_test = example_input("tiny_resnet", batch_size=32, seed=9)
    with torch.no_grad():
        assert torch.equal(eptq_fx.convert(prepared)(x_test), rtn(x_test))

    # without the fallback the wrecked blocks stay
    off = dataclasses.replace(CFG, reconstruction=dataclasses.replace(CFG.reconstruction, fallback=False))
    prepared = _calibrated(model, x, off)
    R.reconstruct(prepared, CalibSet((x,)), off, progress=False)
    with torch.no_grad():
        assert not torch.equal(eptq_fx.convert(prepared)(x_test), rtn(x_test))


def test_unfolded_batchnorms_keep_their_statistics_and_the_fallback_is_exact():
    """ConvMixer's BatchNorms follow a GELU and stay in the graph. Reconstruction trains only the quantizers:
    the BNs keep their running statistics (a BN in training mode had replaced them with minibatch statistics of
    quantized activations: ConvMixer W4A8 EPTQ fell to 10 % top-1, and its RTN fallback with it), and with
    QDrop on, a fallback to round-to-nearest is bit-identical to a method="rtn" run."""
    model, x = make_model("convmixer_tiny"), example_input("convmixer_tiny", batch_size=128, seed=3)
    randomize_batchnorm_(model, seed=1)
    cfg = dataclasses.replace(CFG, reconstruction=dataclasses.replace(CFG.reconstruction, qdrop=0.5))
    prepared = _calibrated(model, x, cfg)
    bns = {n: m for n, m in prepared.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bns
    before = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for n, m in bns.items()}
    rtn_state = snapshot_rtn(prepared)
    R.reconstruct(prepared, CalibSet((x,)), cfg, progress=False)
    for n, m in bns.items():
        assert torch.equal(m.running_mean, before[n][0]) and torch.equal(m.running_var, before[n][1])
        assert int(m.num_batches_tracked) == before[n][2] and not m.training
    restore_rtn_(prepared, rtn_state)
    rtn = eptq_fx.quantize(model, x, dataclasses.replace(cfg, method="rtn"), progress=False)
    x_test = example_input("convmixer_tiny", batch_size=32, seed=9)
    with torch.no_grad():
        assert torch.equal(eptq_fx.convert(prepared)(x_test), rtn(x_test))


def test_training_never_sees_the_held_out_samples(monkeypatch):
    seen = []
    real_randint = torch.randint

    def spy(low, high, *a, **k):
        seen.append(high)
        return real_randint(low, high, *a, **k)

    monkeypatch.setattr(torch, "randint", spy)
    model, x = make_model("small_cnn"), example_input("small_cnn", batch_size=128, seed=5)
    R.reconstruct(_calibrated(model, x, CFG), CalibSet((x,)), CFG, progress=False)
    assert 128 - 16 in seen and 128 not in seen  # 1/8 of 128 held out


def test_holdout_validated():
    with pytest.raises(ConfigError, match="fallback_holdout"):
        ReconstructionConfig(fallback_holdout=0.9)


def _float_values(prepared, x, names):
    """The float model's value at each named node for the samples x (an independent fx Interpreter run)."""
    vals = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                vals[n.name] = out
            return out

    with torch.no_grad(), quant_disabled(prepared):
        Recorder(prepared).run(x)
    return vals


def test_block_target_matches_block_outputs_not_layer_outputs(monkeypatch):
    """Target.BLOCK: every distance is taken against the float model's value at a block output (after the
    residual add / ReLU that follow the block's convs), never at a conv output; the per-layer target does the
    opposite; the solutions differ."""
    model, x = make_model("tiny_resnet"), example_input("tiny_resnet", batch_size=128, seed=3)
    real = R._distance

    def run(target):
        seen = []
        monkeypatch.setattr(R, "_distance", lambda p, t, prof=None: seen.append(t[0].clone()) or real(p, t, prof))
        cfg = dataclasses.replace(CFG, reconstruction=dataclasses.replace(CFG.reconstruction, target=target))
        prepared = _calibrated(model, x, cfg)
        schedule_blocks(prepared, cfg.reconstruction.granularity)  # as reconstruct will
        blocks = prepared.meta[BLOCKS]
        outs = {n for b in blocks for n in b.outputs}
        layers = {n for b in blocks for n in b.quant_ops} - outs
        vals = _float_values(prepared, x, outs | layers)  # before reconstruction trains the biases
        R.reconstruct(prepared, CalibSet((x,)), cfg, progress=False)
        hits = lambda row, names: any(v.shape[1:] == row.shape and torch.isclose(  # noqa: E731
            v, row.unsqueeze(0), rtol=1e-4, atol=1e-5).flatten(1).all(1).any() for k, v in vals.items() if k in names)
        return prepared, [(hits(t, outs), hits(t, layers)) for t in seen]

    blk, seen_blk = run("block")
    assert seen_blk and all(o and not lay for o, lay in seen_blk)
    lay, seen_lay = run("layers")
    assert any(lay_hit and not o for o, lay_hit in seen_lay)
    with torch.no_grad():
        assert not torch.equal(blk(x), lay(x))
    with pytest.raises(ConfigError, match="target must be one of"):
        ReconstructionConfig(target="output")


def test_block_target_weighs_samples_by_the_hessian_at_block_outputs():
    """Under Target.BLOCK the Hessian stage also scores the block outputs (not the model output, where J = I),
    and reconstruction consumes those per-sample scores: dropping them changes the solution."""
    cfg = dataclasses.replace(CFG, reconstruction=dataclasses.replace(CFG.reconstruction, target="block"))
    model, x = make_model("tiny_resnet"), example_input("tiny_resnet", batch_size=128, seed=3)
    a = _calibrated(model, x, cfg)
    est = estimate_hessian(a, CalibSet((x,)), cfg, progress=False)
    blocks = plan_blocks(a, "block")
    outs = [n for b in blocks for n in b.outputs]
    assert est.block_outputs is not None and set(est.block_outputs.names) <= set(outs)
    assert set(est.block_outputs.names).isdisjoint(est.activation.names)
    assert est.block_outputs.scores.shape == (128, len(est.block_outputs.names))
    assert bool((est.block_outputs.scores > 0).all())
    assert float(est.block_outputs.scores.std(0).min()) > 0  # varies over samples: the weights can matter
    R.reconstruct(a, CalibSet((x,)), cfg, progress=False, hessian=est)
    b = _calibrated(model, x, cfg)
    R.reconstruct(b, CalibSet((x,)), cfg, progress=False, hessian=dataclasses.replace(est, block_outputs=None))
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))


def test_paired_standard_error_matches_numpy():
    import numpy as np

    from eptq_fx.method.fallback import paired_standard_error

    rng = np.random.default_rng(4)
    diff = rng.standard_normal(128) * 3.0 + 0.5
    expected = float(np.std(diff, ddof=1) / np.sqrt(len(diff)))
    assert paired_standard_error(torch.tensor(diff, dtype=torch.float32), len(diff)) == pytest.approx(expected,
                                                                                                    rel=1e-6)
    assert paired_standard_error(torch.tensor([2.0]), 1) == 0.0
    assert paired_standard_error(torch.full((16,), 0.25), 16) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("z, reverts", [(0.0, True), (1e9, False)])
def test_block_fallback_reverts_only_beyond_z_standard_errors(monkeypatch, caplog, z, reverts):
    """Each block ends slightly worse than round-to-nearest on its held-out samples (its biases are nudged after
    training): under z = 0 every block reverts, so the result is round-to-nearest's; under a huge z every block
    keeps its optimised (nudged) state."""
    model, x = make_model("tiny_resnet"), example_input("tiny_resnet", batch_size=128, seed=3)
    finish = R._Trainer.finish

    def finish_then_nudge(self):
        finish(self)
        with torch.no_grad():
            for op in self.parts.weight_ops.values():
                if op.op.bias is not None:
                    op.op.bias.add_(0.5)

    monkeypatch.setattr(R._Trainer, "finish", finish_then_nudge)
    rc = dataclasses.replace(CFG.reconstruction, block_fallback_z=z, fallback=False)
    cfg = dataclasses.replace(CFG, reconstruction=rc)
    prepared = _calibrated(model, x, cfg)
    with caplog.at_level(logging.INFO, logger=R.__name__):
        R.reconstruct(prepared, CalibSet((x,)), cfg, progress=False)
    reverted = caplog.text.count("kept round-to-nearest")
    kept = caplog.text.count("kept the optimised block")
    n_blocks = len(prepared.meta[BLOCKS])
    assert (reverted, kept) == ((n_blocks, 0) if reverts else (0, n_blocks))
    rtn = eptq_fx.quantize(model, x, dataclasses.replace(CFG, method="rtn"), progress=False)
    x_test = example_input("tiny_resnet", batch_size=32, seed=9)
    with torch.no_grad():
        assert torch.equal(eptq_fx.convert(prepared)(x_test), rtn(x_test)) == reverts


@pytest.mark.parametrize("z", [-1.0, float("nan"), float("inf")])
def test_block_fallback_z_is_validated(z):
    with pytest.raises(ConfigError, match="block_fallback_z"):
        ReconstructionConfig(block_fallback_z=z)


def test_network_choice_reverts_the_risen_blocks_before_everything():
    """choose_network_result_: the whole reconstruction when it is closer to float on the held-out samples than
    round-to-nearest; else round-to-nearest in the quantizers of the risen blocks only, if that is closer; else
    round-to-nearest everywhere (the same model as a method="rtn" run)."""
    import copy

    from eptq_fx.method.fallback import choose_network_result_, float_outputs, output_error

    off = dataclasses.replace(CFG, weight_bits=2, reconstruction=dataclasses.replace(CFG.reconstruction, iters=80,
                                                                                    fallback=False))
    model, x = make_model("small_cnn"), example_input("small_cnn", batch_size=128, seed=5)
    calib, hold = CalibSet((x,)), torch.arange(96, 128)
    prepared = _calibrated(model, x, off)
    rtn_state, f_hold = snapshot_rtn(prepared), float_outputs(prepared, calib, hold)
    rtn_err = output_error(prepared, calib, hold, f_hold)
    with torch.no_grad():
        rtn_out = prepared.eval()(x)
    R.reconstruct(prepared, calib, off, progress=False)
    ops = list(weight_ops(prepared))
    first, last = ops[0], ops[-1]

    def damaged(name):  # a copy of the reconstructed model with one layer's bias far off
        gm = copy.deepcopy(prepared)
        with torch.no_grad():
            gm.get_submodule(name).op.bias.add_(10.0)
        return gm

    gm = copy.deepcopy(prepared)
    with torch.no_grad():
        eptq_out = gm(x)
    assert output_error(gm, calib, hold, f_hold) < rtn_err
    assert choose_network_result_(gm, calib, hold, f_hold, rtn_state, rtn_err, {first}) == "eptq"
    with torch.no_grad():
        assert torch.equal(gm(x), eptq_out)

    gm = damaged(last)
    assert output_error(gm, calib, hold, f_hold) > rtn_err
    assert choose_network_result_(gm, calib, hold, f_hold, rtn_state, rtn_err, {last}) == "partial"
    assert output_error(gm, calib, hold, f_hold) <= rtn_err
    assert torch.equal(gm.get_submodule(last).op.bias, rtn_state.weights[last][1])
    assert torch.equal(gm.get_submodule(last).weight_quant.scale, rtn_state.weights[last][0])
    assert torch.equal(gm.get_submodule(first).weight_quant.scale, prepared.get_submodule(first).weight_quant.scale)
    assert torch.equal(gm.get_submodule(first).op.bias, prepared.get_submodule(first).op.bias)

    gm = damaged(last)  # the damaged layer is not among the risen ones: only a full revert helps
    assert choose_network_result_(gm, calib, hold, f_hold, rtn_state, rtn_err, {first}) == "rtn"
    with torch.no_grad():
        assert torch.equal(gm(x), rtn_out)
    gm = damaged(last)
    assert choose_network_result_(gm, calib, hold, f_hold, rtn_state, rtn_err, set()) == "rtn"


def test_the_network_outcome_is_recorded_and_reported(monkeypatch):
    """What the network-level fallback kept is on the prepared graph and in eptq_fx.report: "rtn" with every
    quantizer, "partial" with the quantizers of the blocks that reported a rise, "unchecked" without the test."""
    from eptq_fx.graph.meta import RECONSTRUCTION_OUTCOME
    from eptq_fx.method.fallback import active_quantizers
    from eptq_fx.report import format_table, report

    model, x = make_model("tiny_resnet"), example_input("tiny_resnet", batch_size=128, seed=3)
    wrecked: list[set[str]] = []

    def train(rise_first: bool):
        def fake(sub, block, parts, *args, **kwargs):  # the first block wrecks the network, the others do nothing
            if not wrecked:
                wrecked.append(set(parts.weight_ops) | set(parts.act_quants))
                for op in parts.weight_ops.values():
                    with torch.no_grad():
                        op.op.bias.add_(5.0)
                return 1.0, (1.5 if rise_first else 0.5), 20.0
            return 1.0, 0.9, 20.0
        return fake

    monkeypatch.setattr(R, "_train_block", train(rise_first=False))
    prepared = _calibrated(model, x, CFG)
    R.reconstruct(prepared, CalibSet((x,)), CFG, progress=False)
    assert prepared.meta[RECONSTRUCTION_OUTCOME] == {"kept": "rtn", "reverted": active_quantizers(prepared)}

    wrecked.clear()
    monkeypatch.setattr(R, "_train_block", train(rise_first=True))
    prepared = _calibrated(model, x, CFG)
    R.reconstruct(prepared, CalibSet((x,)), CFG, progress=False)
    assert prepared.meta[RECONSTRUCTION_OUTCOME] == {"kept": "partial", "reverted": sorted(wrecked[0])}
    rtn = eptq_fx.quantize(model, x, dataclasses.replace(CFG, method="rtn"), progress=False)
    with torch.no_grad():  # the other blocks did not change anything: back at round-to-nearest exactly
        assert torch.equal(eptq_fx.convert(prepared)(x[:8]), rtn(x[:8]))

    monkeypatch.undo()
    off = dataclasses.replace(CFG, reconstruction=dataclasses.replace(CFG.reconstruction, fallback=False))
    rep = report(eptq_fx.quantize(model, x, off, progress=False))
    assert rep["totals"]["reconstruction"] == {"kept": "unchecked", "reverted": []}
    assert "reconstruction: kept without the network-level test" in format_table(rep)
    rep = report(eptq_fx.quantize(model, x, CFG, progress=False))
    kept = rep["totals"]["reconstruction"]["kept"]
    assert kept in ("eptq", "partial", "rtn") and "reconstruction: " in format_table(rep)
    assert report(rtn)["totals"]["reconstruction"] is None  # method="rtn": nothing was reconstructed


def test_a_resumed_run_knows_which_blocks_rose(monkeypatch, tmp_path):
    """The partial network fallback reverts the blocks whose held-out loss rose; a resumed run restores its
    blocks from the checkpoint files rather than training them, and must still know which ones rose."""
    from eptq_fx.graph.meta import RECONSTRUCTION_OUTCOME

    cfg = dataclasses.replace(CFG, weight_bits=2, reconstruction=dataclasses.replace(CFG.reconstruction, iters=80))
    model, x = make_model("small_cnn"), example_input("small_cnn", batch_size=128, seed=5)
    calls, real = [], R._train_block
    first = _calibrated(model, x, cfg)
    last = len(plan_blocks(first, cfg.reconstruction.granularity)) - 1

    def fake(sub, block, parts, *args, **kwargs):  # trains; then the last block wrecks the network, reports a rise
        calls.append(block.index)
        before, after, sqnr = real(sub, block, parts, *args, **kwargs)
        if block.index != last:
            return before, min(after, before), sqnr
        for op in parts.weight_ops.values():
            with torch.no_grad():
                op.op.bias.add_(5.0)
        return before, 1.5 * before, sqnr

    monkeypatch.setattr(R, "_train_block", fake)
    R.reconstruct(first, CalibSet((x,)), cfg, progress=False, resume_dir=str(tmp_path))
    assert first.meta[RECONSTRUCTION_OUTCOME]["kept"] == "partial"
    n_trained = len(calls)
    resumed = _calibrated(model, x, cfg)
    R.reconstruct(resumed, CalibSet((x,)), cfg, progress=False, resume_dir=str(tmp_path))
    assert len(calls) == n_trained  # every block came from its file
    assert resumed.meta[RECONSTRUCTION_OUTCOME] == first.meta[RECONSTRUCTION_OUTCOME]
    with torch.no_grad():
        assert torch.equal(eptq_fx.convert(resumed)(x[:8]), eptq_fx.convert(first)(x[:8]))
