"""PyTorch reference benchmark of one official PixArt-alpha training step (CPU or CUDA).

The step of train_scripts/train.py: forward of PixArtTransformer2DModel at x_t, the IDDPM
learned-range loss (MSE + VB, the same function the fixtures use), backward, clip_grad_norm_(0.01),
AdamW(lr 2e-5, eps 1e-10, weight_decay 0.03).step(). Config as scripts/bench_dit_torch.py: 12
layers, 6 heads x 64 (hidden 384), 32x32 latents, patch 2, caption_channels 4096, batch 2, 120
text tokens (20 / 120 valid), t = [999, 500], float32, random weights.

Run (venv from /work/shared/reference-env.md; diffusers 0.42.1, torch 2.15.0):
    /work/refvenv/bin/python scripts/bench_train_torch.py --threads 2 --repeat 10

Prints one JSON line: median and min milliseconds per step (warm-up excluded) and the peak
resident memory of the process (ru_maxrss), also measured before the first step; on CUDA also
torch.cuda.max_memory_allocated.

The same options as `pixart bench train`: --config xl (PixArt-XL/2), --size 512 (64x64 latents),
--batch N (the two samples repeated), --grad-checkpoint, --device cuda, and --mixed-precision bf16
(torch.autocast in bfloat16 around forward and loss, f32 master weights and AdamW: Accelerate's
`mixed_precision: bf16`, which PixArt's training code runs through). On a GPU:
    python scripts/bench_train_torch.py --device cuda --config xl --size 512 --batch 2 \
        --mixed-precision bf16 --repeat 20
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch_precision

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "fixtures")]


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", choices=["dit", "xl"], default="dit")
    ap.add_argument("--size", type=int, default=256, help="image pixels (latents are size / 8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    torch_precision.add_argument(ap)
    args = ap.parse_args()

    # The fixture module sets one interop thread on import (it may be set only once).
    from generate import OfficialIDDPM, official_training_losses

    torch.set_num_threads(args.threads)
    torch_precision.apply(args)
    torch.use_deterministic_algorithms(False)  # the fixtures want it; a benchmark should not
    torch.manual_seed(0)

    import diffusers
    from bench_dit_torch import build_model, inputs

    dev = torch.device(args.device)
    latent = args.size // 8
    model = build_model(args.config, latent).train().to(dev)
    if args.grad_checkpoint:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.999), eps=1e-10, weight_decay=0.03)
    iddpm = OfficialIDDPM("1000")

    # The two benchmark samples, repeated to --batch.
    reps = -(-args.batch // 2)
    x0, text, mask, t = (v.repeat(reps, *[1] * (v.ndim - 1))[: args.batch] for v in inputs(latent))
    noise = torch.randn(x0.shape)
    acp = iddpm.alphas_cumprod
    import numpy as np

    x_t = iddpm._extract(np.sqrt(acp), t, x0.shape) * x0 + iddpm._extract(np.sqrt(1 - acp), t, x0.shape) * noise
    x0, x_t, noise, text, mask, t = (v.to(dev) for v in (x0, x_t, noise, text, mask, t))
    # The loss's coefficient tables live on the CPU: bring each to the batch's device.
    extract_on_cpu = iddpm._extract
    iddpm._extract = lambda arr, t, shape: extract_on_cpu(arr, t.cpu(), shape).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def step():
        optimizer.zero_grad()
        with autocast:
            out = model(x_t, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
        loss = official_training_losses(iddpm, x0, t, noise, out.float())["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
        optimizer.step()
        return loss.item()  # waits for the GPU

    before = peak_rss_mib()
    times = []
    for i in range(args.warmup + args.repeat):
        t0 = time.perf_counter()
        loss = step()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    assert np.isfinite(loss)

    print(json.dumps({
        "bench": "pixart_train_step_torch",
        "config": args.config,
        "size": args.size,
        "batch": args.batch,
        "grad_checkpoint": args.grad_checkpoint,
        "mixed_precision": args.mixed_precision,
        "device": args.device,
        "trainable": sum(p.numel() for p in model.parameters()),
        "threads": args.threads,
        "fp32_precision": args.fp32_precision,
        "repeat": args.repeat,
        "median_ms": round(statistics.median(times), 2),
        "min_ms": round(min(times), 2),
        "peak_rss_mib": round(peak_rss_mib()),
        "rss_before_steps_mib": round(before),
        "gpu_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }))


if __name__ == "__main__":
    main()
