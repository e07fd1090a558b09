"""PyTorch (diffusers) reference benchmark of one PixArtTransformer2DModel forward on CPU.

Config: 12 layers, 6 heads x 64 (hidden 384), sample_size 32 (32x32 latents), patch 2, in 4 / out 8
channels, caption_channels 4096, cross_attention_dim 384; batch 2 with 120 text tokens, masks with
20 and 120 valid tokens; float32, random weights, torch.no_grad.

Run (venv from /work/shared/reference-env.md; diffusers 0.42.1, torch 2.15.0):
    /work/refvenv/bin/python scripts/bench_dit_torch.py --threads 2 --repeat 10

Prints one JSON line: median and min milliseconds per forward, warm-up excluded.
"""

import argparse
import json
import statistics
import time

import torch
import torch_precision


# The benchmark transformer, and PixArt-XL/2 (as `pixart bench train --train-config xl`).
CONFIGS = {
    "dit": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, cross_attention_dim=384),
    "xl": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152),
}


def build_model(config="dit", sample_size=32):
    """The benchmark transformer, random weights everywhere (the zero-initialised layers too)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=sample_size,
        **CONFIGS[config],
        in_channels=4,
        out_channels=8,
        patch_size=2,
        caption_channels=4096,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        activation_fn="gelu-approximate",
        attention_bias=True,
        num_embeds_ada_norm=1000,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10.0))
    return model


def inputs(latent=32):
    """Latents [2, 4, 32, 32], text [2, 120, 4096] with 20 and 120 valid tokens, t = [999, 500]."""
    x = torch.randn(2, 4, latent, latent)
    text = torch.randn(2, 120, 4096)
    mask = torch.zeros(2, 120, dtype=torch.int64)
    mask[0, :20] = 1
    mask[1, :] = 1
    t = torch.tensor([999, 500], dtype=torch.int64)
    return x, text, mask, t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    torch_precision.add_argument(ap)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch_precision.apply(args)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)

    import diffusers

    model = build_model().eval()
    x, text, mask, t = inputs()

    def fwd():
        return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample

    times = []
    with torch.no_grad():
        for _ in range(args.warmup):
            out = fwd()
        assert out.shape == (2, 8, 32, 32) and torch.isfinite(out).all()
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fwd()
            times.append((time.perf_counter() - t0) * 1e3)

    print(json.dumps({
        "bench": "pixart_dit_forward_torch",
        "config": "12 layers, hidden 384 (6x64), 32x32 latents, patch 2, caption 4096, batch 2, 120 tokens (20/120 valid), f32",
        "threads": args.threads,
        "fp32_precision": args.fp32_precision,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "median_ms": round(statistics.median(times), 2),
        "min_ms": round(min(times), 2),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }))


if __name__ == "__main__":
    main()
