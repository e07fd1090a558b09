"""PyTorch (diffusers) side of `pixart bench pipeline`: the same job on the same folder.

Loads a PixArtAlphaPipeline folder (e.g. one written by tests/fixtures/generate_real_scale.py),
encodes a prompt and the empty negative with T5 (120 tokens), samples N steps of DPM-Solver++
at the given size with classifier-free guidance (batch 2), decodes with the VAE, and prints one
JSON line with the same fields as `pixart bench pipeline`:
  load_s, t5_s, step_s (median of the steps), steps_s (all steps), vae_s, peak_rss_mib.

Run (venv from /work/shared/reference-env.md; diffusers 0.42.1, torch 2.15.0), same threads
as the Rust side (RAYON_NUM_THREADS):
    /work/refvenv/bin/python scripts/bench_pipeline_torch.py --model /tmp/pixart-real/PixArt-XL-2-512x512 \
        --size 512 --steps 20 --threads 2
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch_precision


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--release-text-encoder",
        action="store_true",
        help="drop the text encoder once the prompts are encoded (del + gc, as low-memory users do)",
    )
    ap.add_argument("--prompt", default="a small cactus with a happy face in the sahara desert")
    torch_precision.add_argument(ap)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch_precision.apply(args)
    torch.set_num_interop_threads(1)
    from diffusers import PixArtAlphaPipeline

    start = time.perf_counter()
    pipe = PixArtAlphaPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    load_s = time.perf_counter() - start

    with torch.no_grad():
        start = time.perf_counter()
        pos, pos_mask, neg, neg_mask = pipe.encode_prompt(
            args.prompt, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=120
        )
        t5_s = time.perf_counter() - start
        if args.release_text_encoder:
            import gc

            pipe.text_encoder = None
            gc.collect()

        stamps = [time.perf_counter()]

        def on_step(_i, _t, _latents):
            stamps.append(time.perf_counter())

        latents = pipe(
            prompt_embeds=pos,
            prompt_attention_mask=pos_mask,
            negative_prompt=None,
            negative_prompt_embeds=neg,
            negative_prompt_attention_mask=neg_mask,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback=on_step,
            callback_steps=1,
        ).images
        steps = [b - a for a, b in zip(stamps, stamps[1:])]

        start = time.perf_counter()
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        vae_s = time.perf_counter() - start
    assert torch.isfinite(image).all(), "non-finite image"

    print(
        json.dumps(
            {
                "bench": "pipeline",
                "impl": "diffusers",
                "torch": torch.__version__,
                "model": args.model,
                "size": args.size,
                "steps": args.steps,
                "threads": args.threads,
                "fp32_precision": args.fp32_precision,
                "release_text_encoder": args.release_text_encoder,
                "load_s": round(load_s, 3),
                "t5_s": round(t5_s, 3),
                "step_s": round(statistics.median(steps), 3),
                "steps_s": round(sum(steps), 3),
                "vae_s": round(vae_s, 3),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
