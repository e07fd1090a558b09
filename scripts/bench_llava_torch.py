"""Greedy LLaVA generation speed with transformers on CPU, and the model folder
`pixart bench caption` reads, so both run the same weights and prompt.

Config ("mid-size"): CLIP ViT 12 layers x 768 (12 heads), 224 px, patch 14 (256
image tokens); Llama 12 layers x 768 (12 heads, 4 KV heads), MLP 2048, vocab
32000; GELU projector; float32, seeded random weights. The tokenizer, processor
and chat template are the test fixture's (tests/fixtures/tiny-llava).

    /work/refvenv/bin/python scripts/bench_llava_torch.py --out /tmp/llava-mid --threads 2
    ./target/release/pixart bench caption --model /tmp/llava-mid --threads 2

Prints one JSON line: prompt tokens, prefill seconds (vision tower + prompt),
decode tokens per second over `--tokens` new tokens (medians of `--repeat`), and
the generated ids (the Rust side should produce the same).
"""

import argparse
import json
import os
import shutil
import statistics
import time

import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "tiny-llava")
PROMPT = "Describe this image and its style in a very detailed manner."


def build(out):
    processor = LlavaProcessor.from_pretrained(FIXTURE)
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=14, hidden_act="quick_gelu",
        ),
        text_config=LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
            rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=256,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        # Never stop early: the benchmark times a fixed number of tokens.
        model.lm_head.weight[tok.eos_token_id].zero_()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    processor.patch_size = 14
    processor.save_pretrained(out)
    return model, processor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/llava-mid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = build(args.out)
    image = Image.open(os.path.join(HERE, "..", "tests", "fixtures", "reference", "llava-2.png")).convert("RGB")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(conv, add_generation_prompt=True),
                       return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    prefill, decode, ids = [], [], None
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            decode.append((args.tokens - 1) / ((t2 - t1) - (t1 - t0)))
            ids = out[0, n_prompt:].tolist()
    print(json.dumps({
        "prompt_tokens": n_prompt, "prefill_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode), "threads": args.threads, "ids": ids,
    }))


if __name__ == "__main__":
    main()
