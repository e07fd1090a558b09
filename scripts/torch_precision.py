"""The `--fp32-precision` option the PyTorch benchmark scripts share.

oneDNN's `fp32_precision = "bf16"` lets f32 matmuls and convolutions round
their operands to bf16 (AMX or AVX512_BF16 where the CPU has them), the
counterpart of `pixart --matmul-precision bf16`; "ieee" is PyTorch's default.
"""

import torch


def add_argument(parser):
    parser.add_argument(
        "--fp32-precision",
        choices=["ieee", "bf16"],
        default="ieee",
        help="oneDNN's precision for f32 matmuls and convolutions (bf16: as pixart's --matmul-precision bf16)",
    )


def apply(args):
    torch.backends.mkldnn.fp32_precision = args.fp32_precision
