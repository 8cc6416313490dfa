"""Per-block checkpoints of a reconstruction run, so an interrupted run resumes at the last finished block.

A run directory holds ``manifest.json`` (the fingerprint of model, config and calibration data) and one
``block_<i>.pt`` per finished block with the decided state of that block's quantizers. Files are written to a
temporary name and renamed, so a kill at any moment leaves either the old or the new file, never half a file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import fx

from eptq_fx.config import EPTQConfig
from eptq_fx.data import CalibSet
from eptq_fx.errors import CheckpointError
from eptq_fx.graph.passes.qdq_insertion import act_quantizers

logger = logging.getLogger(__name__)

FORMAT = 1


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_fingerprint(prepared: fx.GraphModule, config: EPTQConfig, calib: CalibSet) -> dict:
    # Activation ranges are a function of data and config, which have fingerprints of their own: leaving them
    # out of the model's lets a refusal name what really changed.
    calibrated = tuple(f"{name}." for name in act_quantizers(prepared))
    h = hashlib.sha256(prepared.code.encode())
    for name, t in prepared.state_dict().items():
        if name.startswith(calibrated):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    settings = config.fingerprint_dict()
    settings["hessian"].pop("cache_dir", None)  # where Hessians are cached does not change the result
    cfg = json.dumps(settings, sort_keys=True, default=str)
    return {"format": FORMAT, "model": h.hexdigest()[:16],
            "config": hashlib.sha256(cfg.encode()).hexdigest()[:16], "data": calib.fingerprint()}


class RunCheckpoint:
    def __init__(self, root: Path):
        self.root = root
        self.rose: dict[int, bool] = {}  # per restored block: its saved ``rose`` flag

    @classmethod
    def open(cls, resume_dir: str, prepared: fx.GraphModule, config: EPTQConfig, calib: CalibSet) -> RunCheckpoint:
        """Create the run directory, or check that an existing one belongs to this model / config / data."""
        root = Path(resume_dir)
        root.mkdir(parents=True, exist_ok=True)
        fp = run_fingerprint(prepared, config, calib)
        manifest = root / "manifest.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{manifest} is damaged ({e}); delete the directory to start over.") from e
            diff = [k for k in ("format", "model", "config", "data") if old.get(k) != fp[k]]
            if diff:
                raise CheckpointError(
                    f"Resume directory {root} was written for a different {' / '.join(diff)}; "
                    f"use a new directory or the original {' / '.join(diff)}."
                )
            done = sorted(int(p.stem.split("_")[1]) for p in root.glob("block_*.pt"))
            logger.info("resuming from %s: %d finished block(s) %s", root, len(done), done)
        else:
            _atomic_write(manifest, lambda f: f.write(json.dumps(fp, indent=1).encode()))
        return cls(root)

    def _path(self, index: int) -> Path:
        return self.root / f"block_{index}.pt"

    def save_block(self, index: int, parts, rose: bool = False) -> None:
        """``rose``: the block's held-out loss ended above round-to-nearest's (kept within block_fallback_z), which
        the network-level fallback needs to know after a resume too."""
        state = {
            "rose": rose,
            "weights": {name: {"scale": op.weight_quant.scale.detach().clone(),
                               "w_floor": op.weight_quant.w_floor.clone(),
                               "alpha": op.weight_quant.alpha.detach().clone(),
                               "mode": op.weight_quant.mode,
                               "bias": None if op.op.bias is None else op.op.bias.detach().clone()}
                        for name, op in parts.weight_ops.items()},
            "acts": {name: {"scale": aq.scale.detach().clone(), "zero_point": aq.zero_point.clone()}
                     for name, aq in parts.act_quants.items()},
        }
        _atomic_write(self._path(index), lambda f: torch.save(state, f))

    def restore_block_(self, index: int, parts) -> bool:
        """Load a finished block's state into its quantizers; False when that block has not finished."""
        path = self._path(index)
        if not path.exists():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file torch cannot read: refuse rather than silently retrain
            raise CheckpointError(f"{path} cannot be read ({e}); delete it to retrain that block.") from e
        if set(state["weights"]) != set(parts.weight_ops) or set(state["acts"]) != set(parts.act_quants):
            raise CheckpointError(f"{path} does not match block {index} of this model; use a new directory.")
        self.rose[index] = bool(state.get("rose", False))  # files from before stop 32 have no flag
        with torch.no_grad():
            for name, op in parts.weight_ops.items():
                s, wq = state["weights"][name], op.weight_quant
                wq.scale.copy_(s["scale"])
                # the file is read onto the CPU: back onto the model's device
                wq.w_floor = s["w_floor"].to(wq.scale.device, copy=True)
                wq.alpha = torch.nn.Parameter(s["alpha"].to(wq.scale.device, copy=True), requires_grad=False)
                wq.mode = s["mode"]
                if s["bias"] is not None:
                    op.op.bias.copy_(s["bias"])
            for name, aq in parts.act_quants.items():
                aq.scale.copy_(state["acts"][name]["scale"])
                aq.zero_point.copy_(state["acts"][name]["zero_point"])
        logger.info("block %d restored from %s", index, path)
        return True
