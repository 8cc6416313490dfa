"""Interrupted runs resume: a reconstruction process is SIGKILLed at several points, resumed from its checkpoint
directory, and must end with integer weights bit-identical to an uninterrupted run. A checkpoint directory of
another model / config / data, or a damaged one, is refused with a CheckpointError."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eptq_fx
import eptq_fx.pipeline
from eptq_fx import CheckpointError
from tests import helpers_resume as H

REPO = Path(__file__).resolve().parents[1]
N_BLOCKS = 5  # ResidualMLP: fc_in, three residual blocks, fc_out
KILL_TIMEOUT_S = 600.0  # generous: on a shared, saturated machine the five start-ups crawl


def assert_same_integer_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"differ from the uninterrupted run: {differ}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted run (with checkpoints), in this process."""
    run_dir = tmp_path_factory.mktemp("reference")
    state = H.integer_state(H.run(str(run_dir)))
    assert sorted(p.name for p in run_dir.glob("block_*.pt")) == [f"block_{i}.pt" for i in range(N_BLOCKS)]
    return state, run_dir


def start_and_kill(runs: dict[str, Path]) -> None:
    """Start one helpers_resume subprocess per hold point (concurrently: most of their time is start-up), wait
    until each holds, SIGKILL it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    # Five processes share two cores: OpenMP threads that spin while waiting would starve each other.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    procs = {hold: subprocess.Popen([sys.executable, "-m", "tests.helpers_resume", str(run_dir), "--hold", hold,
                                     "--threads", str(torch.get_num_threads())],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for hold, run_dir in runs.items()}
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        waiting = dict(procs)
        while waiting:
            for hold, proc in list(waiting.items()):
                if (runs[hold] / "holding").exists():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    assert proc.returncode == -signal.SIGKILL
                    (runs[hold] / "holding").unlink()
                    del waiting[hold]
                elif proc.poll() is not None:
                    pytest.fail(f"helper {hold} exited ({proc.returncode}) before holding: "
                                f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"helpers {sorted(waiting)} did not reach their hold point in {KILL_TIMEOUT_S} s")
            time.sleep(0.02)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def finished_blocks(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in run_dir.glob("block_*.pt"))


# (hold point, blocks finished at the kill, a half-written .tmp left behind)
KILL_POINTS = [
    ("after:0", [0], False),
    ("after:1", [0, 1], False),
    ("after:2", [0, 1, 2], False),
    ("inside:3", [0, 1, 2], False),
    ("save:1", [0], True),
]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, reference) -> dict[str, Path]:
    """One checkpoint directory per kill point, left as a SIGKILLed run left it. Depends on ``reference`` so that
    numba's on-disk kernel cache is warm before five processes start (each would compile ~40 s otherwise)."""
    runs = {hold: tmp_path_factory.mktemp(hold.replace(":", "_")) for hold, _, _ in KILL_POINTS}
    start_and_kill(runs)
    return runs


@pytest.mark.parametrize("hold,finished,torn", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_sigkill_then_resume_is_bit_identical(hold, finished, torn, killed_runs, reference, caplog):
    run_dir = killed_runs[hold]
    assert finished_blocks(run_dir) == finished
    tmp_files = sorted(p.name for p in run_dir.glob("*.tmp"))
    assert tmp_files == ([f"block_{len(finished)}.pt.tmp"] if torn else [])

    with caplog.at_level(logging.INFO, logger="eptq_fx.method.checkpoint"):
        resumed = H.run(str(run_dir))
    restored = sorted(int(m) for m in re.findall(r"block (\d+) restored", caplog.text))
    assert restored == finished  # the finished blocks were loaded, not retrained
    assert f"{len(finished)} finished block(s)" in caplog.text
    assert finished_blocks(run_dir) == list(range(N_BLOCKS))
    assert_same_integer_state(H.integer_state(resumed), reference[0])


def test_resume_of_a_finished_run_restores_every_block(reference, caplog):
    state, run_dir = reference
    with caplog.at_level(logging.INFO, logger="eptq_fx.method.checkpoint"):
        again = H.run(str(run_dir))
    assert len(re.findall(r"block \d+ restored", caplog.text)) == N_BLOCKS
    assert_same_integer_state(H.integer_state(again), state)


def test_uninterrupted_runs_with_and_without_checkpoints_agree(reference):
    assert_same_integer_state(H.integer_state(H.run(None)), reference[0])


@pytest.mark.parametrize("what", ["model", "config", "data"])
def test_resume_with_another_model_config_or_data_is_refused(what, reference, tmp_path):
    _, run_dir = reference
    model, data, config = H.build_model(), H.calibration_data(), H.CONFIG
    if what == "model":
        model = H.build_model(seed=1)
    elif what == "config":
        config = dataclasses.replace(H.CONFIG, seed=H.CONFIG.seed + 1)
    else:
        data = data + 0.01
    with pytest.raises(CheckpointError, match=rf"written for a different {what}; use a new directory"):
        eptq_fx.quantize(model, data, config, resume_dir=str(run_dir), progress=False)


def test_settings_that_do_not_change_the_result_do_not_block_a_resume(reference, tmp_path):
    """The Hessian cache location is not part of the run: resuming with another one restores every block."""
    state, run_dir = reference
    config = dataclasses.replace(H.CONFIG, hessian=dataclasses.replace(H.CONFIG.hessian,
                                                                       cache_dir=str(tmp_path / "cache")))
    again = eptq_fx.quantize(H.build_model(), H.calibration_data(), config, resume_dir=str(run_dir),
                             progress=False)
    assert_same_integer_state(H.integer_state(again), state)


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_damaged_manifest_is_refused(reference, tmp_path):
    run_dir = _copy_run(reference[1], tmp_path / "run")
    (run_dir / "manifest.json").write_text('{"format": 1, "mod')
    with pytest.raises(CheckpointError, match=r"manifest.json is damaged .*delete the directory"):
        H.run(str(run_dir))


def test_damaged_block_file_is_refused(reference, tmp_path):
    run_dir = _copy_run(reference[1], tmp_path / "run")
    data = (run_dir / "block_2.pt").read_bytes()
    (run_dir / "block_2.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"block_2.pt cannot be read .*delete it to retrain that block"):
        H.run(str(run_dir))


def test_cli_resume_flag_reaches_the_checkpoints(tmp_path, monkeypatch, capsys):
    """``eptq-fx quantize --resume DIR`` writes per-block checkpoints to DIR and refuses a mismatching rerun.
    The CLI has no flags for the Hessian / reconstruction budgets, so the test shrinks them on the way in."""
    cli = pytest.importorskip("eptq_fx.cli")
    real_quantize = eptq_fx.pipeline.quantize
    seen: list = []

    def small_quantize(model, calib, config, *args, **kwargs):
        seen.append(kwargs.get("resume_dir"))
        config = dataclasses.replace(config, hessian=H.CONFIG.hessian, reconstruction=H.CONFIG.reconstruction)
        return real_quantize(model, calib, config, *args, **kwargs)

    monkeypatch.setattr(eptq_fx.pipeline, "quantize", small_quantize)
    monkeypatch.chdir(REPO)
    calib = tmp_path / "calib.pt"
    torch.save(H.calibration_data(), calib)
    run_dir = tmp_path / "resume"
    argv = ["quantize", "--model-module", "tests.helpers_resume:build_model", "--calib", str(calib),
            "--bits", "W4A4", "--n-calib", "48", "--seed", "7", "--resume", str(run_dir)]
    assert cli.main(argv) == 0
    assert seen == [str(run_dir)]
    assert (run_dir / "manifest.json").is_file() and finished_blocks(run_dir) == list(range(N_BLOCKS))

    argv[argv.index("--seed") + 1] = "8"
    assert cli.main(argv) == 2
    assert re.search(r"eptq-fx: error: Resume directory .* different config", capsys.readouterr().err)
