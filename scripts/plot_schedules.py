"""Plot noise schedules and sampler sigma spacings for docs/diffusion.md.

    python scripts/plot_schedules.py [--out docs/img/schedules.png] [--steps 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ldm.diffusion.samplers import SIGMA_SPACINGS, get_sigmas  # noqa: E402
from ldm.diffusion.schedule import NoiseSchedule  # noqa: E402

SCHEDULES = {
    "linear (DDPM, 1e-4..0.02)": dict(kind="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear (SD)": dict(kind="scaled_linear"),
    "cosine": dict(kind="cosine"),
    "scaled_linear + zero terminal SNR": dict(kind="scaled_linear", zero_terminal_snr=True),
}


def plot(out: Path, steps: int) -> None:
    fig, (ax_ac, ax_snr, ax_sig) = plt.subplots(1, 3, figsize=(15, 4.2))
    t = torch.arange(1000)
    for label, cfg in SCHEDULES.items():
        sched = NoiseSchedule.from_config(**cfg)
        ax_ac.plot(t, sched.alphas_cumprod, label=label)
        log_snr = sched.snr(t).log()  # -inf at T for zero terminal SNR: matplotlib leaves that point out
        ax_snr.plot(t, log_snr, label=label)
    ax_ac.set(title=r"$\bar\alpha_t$ (signal kept in $x_t$)", xlabel="t")
    ax_snr.set(title=r"$\log \mathrm{SNR}(t) = \log \bar\alpha_t / (1-\bar\alpha_t)$", xlabel="t")
    ax_ac.legend(fontsize=8)

    sd = NoiseSchedule.from_config("scaled_linear")
    zsnr = NoiseSchedule.from_config("scaled_linear", zero_terminal_snr=True)
    for spacing in SIGMA_SPACINGS:
        sigmas = get_sigmas(sd, steps, spacing)[:-1]
        ax_sig.plot(range(steps), sigmas, marker="o", label=f"{spacing} (SD)")
    trailing = get_sigmas(zsnr, steps, "trailing")[:-1]
    ax_sig.plot(range(steps), trailing, marker="x", linestyle="--", label="trailing (zero terminal SNR)")
    ax_sig.set(title=f"sampler sigmas, {steps} steps (final 0 omitted)", xlabel="step", yscale="log")
    ax_sig.legend(fontsize=8)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/schedules.png"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    plot(args.out, args.steps)


if __name__ == "__main__":
    main()
