"""Figure of the learning-rate schedules that experiments train with, composed from their configs.

    python scripts/plot_lr.py --experiment quickstart_clip --experiment quickstart_autoencoder \
        --experiment quickstart_ldm --experiment sd15_finetune --out docs/images/lr_schedules.png

For each experiment: ``python train.py experiment=NAME`` is composed (as Hydra would), its ``model.scheduler`` is
completed around an optimizer at ``model.optimizer.lr``, and the learning rate is read before each of the
``trainer.max_steps`` optimizer steps (Lightning steps these schedulers once per optimizer step).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import hydra  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ldm.utils.resolvers  # noqa: E402,F401  (the configs' ${cpu_precision:...} and friends)

DEFAULT_EXPERIMENTS = ("quickstart_clip", "quickstart_autoencoder", "quickstart_ldm", "sd15_finetune")


def lr_curve(experiment: str, overrides: Sequence[str] = ()) -> tuple[list[float], str]:
    """The LR before every optimizer step of ``experiment``'s run, and its schedule as ``target(arguments)``."""
    GlobalHydra.instance().clear()  # compose afresh, whatever was initialised before
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
    steps = int(cfg.trainer.max_steps)
    if steps <= 0:
        raise ValueError(f"{experiment} ends by epochs (trainer.max_steps={steps}): pass trainer.max_steps=N")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(cfg.model.optimizer.lr))
    scheduler_cfg = cfg.model.get("scheduler")
    scheduler = hydra.utils.instantiate(scheduler_cfg, _partial_=True)(optimizer=optimizer) if scheduler_cfg else None
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    if scheduler_cfg is None:
        return lrs, "constant"
    arguments = {k: v for k, v in scheduler_cfg.items() if k not in ("_target_", "_partial_")}
    name = scheduler_cfg["_target_"].rsplit(".", 1)[-1]
    return lrs, f"{name}({', '.join(f'{k}={v}' for k, v in arguments.items())})"


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", action="append", help=f"repeatable; default: {', '.join(DEFAULT_EXPERIMENTS)}")
    parser.add_argument("--out", default="lr_schedules.png")
    args = parser.parse_args(argv)
    experiments = args.experiment or list(DEFAULT_EXPERIMENTS)
    fig, axes = plt.subplots(1, len(experiments), figsize=(3.9 * len(experiments), 3.2), squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        lrs, schedule = lr_curve(experiment)
        ax.plot(range(len(lrs)), lrs, color="tab:blue")
        ax.set_title(f"{experiment}\n{schedule}", fontsize=7, pad=12)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_ylim(bottom=0)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
