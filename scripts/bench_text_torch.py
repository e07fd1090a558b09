"""PyTorch (transformers) side of `pixart bench text`: one T5 encoder, one prompt.

Loads `--model`/text_encoder (a T5EncoderModel folder) in f32 (bf16 checkpoints are widened,
exactly) and `--model`/tokenizer, encodes the prompt and the empty negative at PixArt's 120
tokens, prints one JSON line (load_s, t5_s, peak_rss_mib) and, with --save, writes both last
hidden states ("positive", "negative", [1, 120, d_model] f32) as the reference that
`pixart bench text --reference` measures its error against.

Run (venv from /work/shared/reference-env.md), same threads as the Rust side:
    /work/refvenv/bin/python scripts/bench_text_torch.py --model /tmp/pixart-xxl/common \
        --threads 2 --save /tmp/pixart-xxl/t5-reference.safetensors
"""

import argparse
import json
import resource
import time

import torch

PROMPT = "a small cactus with a happy face in the sahara desert"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder with tokenizer/ and text_encoder/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--save", help="write the outputs here (safetensors)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from transformers import T5EncoderModel, T5Tokenizer

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    start = time.perf_counter()
    tokenizer = T5Tokenizer.from_pretrained(f"{args.model}/tokenizer")
    model = T5EncoderModel.from_pretrained(f"{args.model}/text_encoder", torch_dtype=dtype).eval()
    load_s = time.perf_counter() - start

    outputs = {}
    start = time.perf_counter()
    with torch.no_grad():
        for name, text in [("positive", PROMPT), ("negative", "")]:
            tokens = tokenizer(
                text, padding="max_length", max_length=120, truncation=True, return_tensors="pt"
            )
            hidden = model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).last_hidden_state
            outputs[name] = hidden.float().contiguous()
    t5_s = time.perf_counter() - start
    assert all(torch.isfinite(t).all() for t in outputs.values()), "non-finite output"
    if args.save:
        from safetensors.torch import save_file

        save_file(outputs, args.save)
    print(
        json.dumps(
            {
                "bench": "text",
                "impl": "transformers",
                "torch": torch.__version__,
                "model": args.model,
                "dtype": args.dtype,
                "layers": model.config.num_layers,
                "threads": args.threads,
                "load_s": round(load_s, 3),
                "t5_s": round(t5_s, 3),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
