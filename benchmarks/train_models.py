"""Train the benchmark models that have no public checkpoint (zoo specs with ``train_epochs > 0``).

    python -m benchmarks.train_models [--models mobilenetv2_fmnist,vit_fmnist] [--force] [--threads 2]

Seeded (deterministic on a given machine and thread count): AdamW with a one-cycle learning rate, batch 128,
no augmentation.
Weights go to benchmarks/.weights/<name>.pt with a <name>.json beside it (float top-1 on the full test split,
training time), so a benchmark run can report the float accuracy without re-evaluating.
"""
from __future__ import annotations

import argparse
import json
import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import Timer, evaluate_top1, load_test, load_train
from benchmarks.zoo import SPECS, WEIGHTS_DIR, ModelSpec, get_spec

log = logging.getLogger(__name__)

BATCH_SIZE = 128
PEAK_LR = 3e-3
WEIGHT_DECAY = 0.05


def train(spec: ModelSpec, seed: int = 0) -> dict:
    """Train ``spec`` from its seeded initialisation, save the weights, return {"float_top1", "train_s", ...}."""
    if not spec.trained_here:
        raise ValueError(f"{spec.name} uses a pretrained checkpoint; nothing to train")
    torch.manual_seed(seed)
    x, y = load_train(spec.dataset, spec.prep)
    # channels_last: CPU convolution backward (depthwise above all) runs about twice as fast in that layout
    model = spec.architecture().train().to(memory_format=torch.channels_last)
    steps = spec.train_epochs * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PEAK_LR, total_steps=steps, pct_start=0.2)
    order_rng = torch.Generator().manual_seed(seed)
    with Timer() as timer, tqdm(total=steps, desc=f"train {spec.name}") as bar:
        for _ in range(spec.train_epochs):
            order = torch.randperm(len(x), generator=order_rng)
            for i in range(0, len(x), BATCH_SIZE):
                idx = order[i:i + BATCH_SIZE]
                batch = x[idx].contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(batch), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    x_test, y_test = load_test(spec.dataset, spec.prep)
    result = {"model": spec.name, "dataset": spec.dataset, "float_top1": evaluate_top1(model, x_test, y_test),
              "train_s": timer.seconds, "epochs": spec.train_epochs, "seed": seed,
              "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
              "recipe": spec.recipe_fingerprint()}
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, spec.cached_weights)
    spec.cached_weights.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def trained_info(spec: ModelSpec) -> dict | None:
    """What training recorded for the cached weights, or None when they are missing or stale."""
    if not spec.weights_current():
        return None
    return json.loads(spec.cached_weights.with_suffix(".json").read_text())


def ensure_trained(names: list[str]) -> None:
    """Train every model in ``names`` that is trained here and has no current cached weights."""
    for name in names:
        spec = get_spec(name)
        if spec.trained_here and not spec.weights_current():
            log.info("training %s (no cached weights for its current recipe)", name)
            train(spec)


def _model_list(text: str | None) -> list[str]:
    if not text:
        return [s.name for s in SPECS.values() if s.trained_here]
    return [n.strip() for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated zoo names (default: every model trained here)")
    parser.add_argument("--force", action="store_true", help="retrain even if weights are cached")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    for name in _model_list(args.models):
        spec = get_spec(name)
        info = None if args.force else trained_info(spec)
        if info is None:
            info = train(spec)
        log.info("%s: float top-1 %.2f%% on %s test (%d params, trained in %.0f s)", name, info["float_top1"],
                  spec.dataset, info["params"], info["train_s"])


if __name__ == "__main__":
    main()
