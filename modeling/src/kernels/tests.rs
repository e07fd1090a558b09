//! Each fused kernel against the composition of candle's primitive ops it
//! replaces, forward and backward.

use super::*;
use candle_core::{Device, Var, D};

/// The fused op and the composition of primitive ops agree, forward and backward.
fn check(fused: impl Fn(&Tensor) -> Result<Tensor>, reference: impl Fn(&Tensor) -> Result<Tensor>) {
    let n = 7 * 300;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 25.0) - 2.0)
        .collect();
    let x = Var::from_tensor(&Tensor::from_vec(v, (7, 300), &Device::Cpu).unwrap()).unwrap();
    let w: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 / 8.0) - 1.0).collect();
    let w = Tensor::from_vec(w, (7, 300), &Device::Cpu).unwrap();
    let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
        let y = f(x.as_tensor()).unwrap();
        let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(x.as_tensor()).unwrap().clone())
    };
    let (y1, g1) = run(&fused);
    let (y2, g2) = run(&reference);
    let err = |a: &Tensor, b: &Tensor| {
        let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
        let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()))
            / scale
    };
    assert!(err(&y1, &y2) < 1e-5, "forward {}", err(&y1, &y2));
    assert!(err(&g1, &g2) < 1e-4, "backward {}", err(&g1, &g2));
}

#[test]
fn fused_ops_match_their_compositions() {
    check(gelu, |x| x.gelu());
    check(
        |x| layer_norm(x, 1e-6),
        |x| {
            let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)
        },
    );
    check(softmax_last_dim, |x| candle_nn::ops::softmax(x, D::Minus1));
}

#[test]
fn fused_attention_matches_the_composition() {
    let dev = Device::Cpu;
    let var = |shape: &[usize], seed: usize| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
    };
    let (b, n, l, heads, dh) = (2, 5, 7, 3, 4);
    let (q, k, v) = (
        var(&[b, n, heads * dh], 1),
        var(&[b, l, heads * dh], 2),
        var(&[b, l, heads * dh], 3),
    );
    let mask: Vec<f32> = (0..b * l)
        .map(|i| if i % l < 4 + i / l { 0.0 } else { -10000.0 })
        .collect();
    let bias = Tensor::from_vec(mask, (b, l), &dev).unwrap();
    let probe = var(&[b, n, heads * dh], 4);
    let run = |fused: bool| {
        let out = if fused {
            attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                heads,
                Some(&bias),
                true,
            )
            .unwrap()
            .unwrap()
        } else {
            plain_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                heads,
                Some(&bias),
            )
        };
        let g = (&out * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![out.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
        for x in [&q, &k, &v] {
            all.push(
                g.get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
        all
    };
    for (i, (a, c)) in run(true).iter().zip(run(false)).enumerate() {
        for (p, r) in a.iter().zip(&c) {
            assert!(
                (p - r).abs() <= 1e-5 * r.abs().max(1.0),
                "part {i}: {p} vs {r}"
            );
        }
    }
}

#[test]
fn linear_modulate_and_gate_match_broadcast_ops() {
    let dev = Device::Cpu;
    let var = |shape: &[usize], seed: usize| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
    };
    let (x, shift, scale, y) = (
        var(&[2, 5, 8], 1),
        var(&[2, 1, 8], 2),
        var(&[2, 1, 8], 3),
        var(&[2, 5, 8], 4),
    );
    let w = var(&[6, 8], 5);
    let b = var(&[6], 6);
    let layer = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
    let probe = var(&[2, 5, 6], 7);
    let all = [&x, &shift, &scale, &y, &w, &b];
    let grads = |fused: bool| {
        let (m, ga, l) = if fused {
            (
                modulate(x.as_tensor(), shift.as_tensor(), scale.as_tensor()).unwrap(),
                gated_add(x.as_tensor(), scale.as_tensor(), y.as_tensor()).unwrap(),
                linear(&layer, x.as_tensor()).unwrap(),
            )
        } else {
            use candle_core::Module;
            (
                x.as_tensor()
                    .broadcast_mul(&(scale.as_tensor() + 1.0).unwrap())
                    .unwrap()
                    .broadcast_add(shift.as_tensor())
                    .unwrap(),
                (x.as_tensor() + scale.as_tensor().broadcast_mul(y.as_tensor()).unwrap()).unwrap(),
                layer.forward(x.as_tensor()).unwrap(),
            )
        };
        let total = ((m.sqr().unwrap().sum_all().unwrap()
            + (ga * 0.5).unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap()
            + (l * probe.as_tensor()).unwrap().sum_all().unwrap())
        .unwrap();
        let g = total.backward().unwrap();
        all.iter()
            .map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    for (i, (a, b)) in grads(true).iter().zip(grads(false)).enumerate() {
        for (p, q) in a.iter().zip(&b) {
            assert!(
                (p - q).abs() <= 1e-4 * q.abs().max(1.0),
                "variable {i}: {p} vs {q}"
            );
        }
    }
}

/// Seeded values in about −1..1 for a tensor of `shape`.
fn filled(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Plain attention by candle's ops, one `[N, L]` score matrix per head.
fn plain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Tensor {
    let (b, n, width) = q.dims3().unwrap();
    let (l, dh) = (k.dim(1).unwrap(), width / heads);
    let split = |x: &Tensor| {
        x.reshape((b, (), heads, dh))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let mut scores =
        (split(q).matmul(&split(k).t().unwrap()).unwrap() * (1.0 / (dh as f64).sqrt())).unwrap();
    if let Some(bias) = bias {
        scores = scores
            .broadcast_add(&bias.reshape((b, 1, 1, l)).unwrap())
            .unwrap();
    }
    candle_nn::ops::softmax(&scores, D::Minus1)
        .unwrap()
        .matmul(&split(v))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, n, width))
        .unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()))
        / scale
}

/// Cases: (batch, query rows, keys, heads, head width, tile budget in scores).
/// Square and ragged, one tile and many, tiles that do not divide the rows, a
/// single query row, cross-attention's few keys.
const TILED_CASES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (1, 64, 64, 1, 16, 1 << 20),
    (2, 64, 64, 2, 8, 16 * 64),
    (2, 103, 77, 3, 8, 40 * 77),
    (1, 1, 9, 2, 4, 16),
    (2, 257, 12, 4, 8, 16 * 12),
];

/// The row-tiled fused forward equals plain attention, with and without a key
/// mask, whatever the tiling.
#[test]
fn tiled_attention_matches_plain_attention() {
    for (i, &(b, n, l, heads, dh, budget)) in TILED_CASES.iter().enumerate() {
        let (q, k, v) = (
            filled(&[b, n, heads * dh], 1 + i),
            filled(&[b, l, heads * dh], 2 + i),
            filled(&[b, l, heads * dh], 3 + i),
        );
        let mask: Vec<f32> = (0..b * l)
            .map(|j| {
                if j % l < 1 + (j / l) * 3 {
                    0.0
                } else {
                    -10000.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, l), &Device::Cpu).unwrap();
        for bias in [None, Some(&mask)] {
            let want = plain_attention(&q, &k, &v, heads, bias);
            for grad in [false, true] {
                let got = attention::attention_with(&q, &k, &v, heads, bias, grad, budget)
                    .unwrap()
                    .unwrap();
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "case {i} (masked {}): {e:e}", bias.is_some());
            }
        }
    }
}

/// Attention by candle's ops in query chunks equals it in one piece.
#[test]
fn chunked_composed_attention_matches_one_piece() {
    for (i, &(b, n, l, heads, dh, budget)) in TILED_CASES.iter().enumerate() {
        let q = filled(&[b, heads, n, dh], 4 + i);
        let (k, v) = (
            filled(&[b, heads, l, dh], 5 + i),
            filled(&[b, heads, l, dh], 6 + i),
        );
        let bias = filled(&[b, 1, 1, l], 7 + i);
        let whole =
            attention::composed_in_chunks(&q, &k, &v, Some(&bias), false, usize::MAX).unwrap();
        let chunked =
            attention::composed_in_chunks(&q, &k, &v, Some(&bias), false, budget * b * heads)
                .unwrap();
        assert!(rel_err(&chunked, &whole) < 1e-6, "case {i}");
    }
}

/// The fused group norm (+ SiLU) equals the differentiable composition it
/// stands in for where no gradient is wanted.
#[test]
fn fused_group_norm_matches_the_composition() {
    for (shape, groups) in [
        (vec![2, 8, 5, 7], 4),
        (vec![1, 6, 9], 3),
        (vec![1, 64, 16, 16], 32),
    ] {
        let c = shape[1];
        let x = filled(&shape, 11);
        let x = ((x * 3.0).unwrap() + 0.5).unwrap();
        let weight = (filled(&[c], 12) + 1.0).unwrap();
        let bias = filled(&[c], 13);
        for silu in [false, true] {
            let fused = group_norm(&x, &weight, &bias, groups, 1e-6, silu).unwrap();
            // A variable input takes the differentiable composition.
            let var = Var::from_tensor(&x).unwrap();
            let composed = group_norm(var.as_tensor(), &weight, &bias, groups, 1e-6, silu).unwrap();
            let e = rel_err(&fused, &composed);
            assert!(e < 1e-5, "{shape:?}, {groups} groups, silu {silu}: {e:e}");
        }
    }
}

/// The inference product against candle's matmul: weights `[O, K]` or stored
/// transposed, f32 or bf16 (widened in one band or in several, ragged), bias or
/// not, on one row and on many.
#[test]
fn dense_forward_matches_matmul() {
    let (o, k) = (37, 29);
    let w = filled(&[o, k], 3);
    let b = filled(&[o], 5);
    let wt = w.t().unwrap().contiguous().unwrap();
    for rows in [1, 2 * 13] {
        let x = filled(&[rows, k], 7).reshape((1, rows, k)).unwrap();
        for narrow in [false, true] {
            let (w, wt) = if narrow {
                (
                    w.to_dtype(DType::BF16).unwrap(),
                    wt.to_dtype(DType::BF16).unwrap(),
                )
            } else {
                (w.clone(), wt.clone())
            };
            // The reference computes with the weight as the product sees it.
            let plain = x
                .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            for bias in [None, Some(&b)] {
                let want = match bias {
                    Some(b) => plain.broadcast_add(b).unwrap(),
                    None => plain.clone(),
                };
                // One band, then bands of 5 rows of either layout (ragged).
                for band in [1 << 22, 5 * 37] {
                    let got = linear::dense(&x, &w, bias, false, band).unwrap();
                    assert!(rel_err(&got, &want) < 1e-6, "[O, K] {rows} {narrow} {band}");
                    let got = linear::dense(&x, &wt, bias, true, band).unwrap();
                    assert!(rel_err(&got, &want) < 1e-6, "[K, O] {rows} {narrow} {band}");
                }
            }
        }
    }
    // The public entry points take the same paths.
    let x = filled(&[3, k], 9);
    let layer = candle_nn::Linear::new(w.clone(), Some(b.clone()));
    let want = x
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    assert!(rel_err(&linear_inference(&layer, &x).unwrap(), &want) < 1e-6);
    let got = linear_transposed_inference(&wt, Some(&b), &x).unwrap();
    assert!(rel_err(&got, &want) < 1e-6);
}

/// The 8-bit product equals f32's on the dequantized weight, both layouts, in one
/// band and in ragged bands; the quantization errs by at most half a step of its
/// block; both layouts quantize alike. Widths of 64 (two blocks of 32) and 29 (one
/// block a row).
#[test]
fn int8_product_matches_the_dequantized_weight() {
    use crate::kernels::{dequantize_int8, linear_int8_inference};
    use crate::weights::quantize_int8;
    for (o, k) in [(37, 64), (37, 29)] {
        let w = filled(&[o, k], 3);
        let wt = w.t().unwrap().contiguous().unwrap();
        let (q, scales) = quantize_int8(&w, false).unwrap();
        let (qt, scales_t) = quantize_int8(&wt, true).unwrap();
        let blocks = if k == 64 { 2 } else { 1 };
        assert_eq!(scales.dims(), &[o, blocks]);
        assert_eq!(scales_t.dims(), &[blocks, o]);
        let dequantized = dequantize_int8(&q, &scales, false).unwrap();
        let back_t = dequantize_int8(&qt, &scales_t, true).unwrap();
        assert!(rel_err(&back_t.t().unwrap(), &dequantized) == 0.0);
        // Each weight within half a step of its block's scale.
        let step = scales
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((o, blocks, k / blocks))
            .unwrap()
            .reshape((o, k))
            .unwrap();
        let err = (&dequantized - &w).unwrap().abs().unwrap();
        let steps = (err / step).unwrap().max_all().unwrap();
        let steps = steps.to_scalar::<f32>().unwrap();
        assert!(steps <= 0.5 + 1e-4, "{steps}");
        // Quantized, not copied: some weights moved.
        assert!(rel_err(&dequantized, &w) > 1e-5);
        for rows in [1, 2 * 13] {
            let x = filled(&[rows, k], 7).reshape((1, rows, k)).unwrap();
            let want = x.broadcast_matmul(&dequantized.t().unwrap()).unwrap();
            for band in [1 << 22, 5 * 37] {
                let got = linear::dense_int8(&x, &q, &scales, false, band).unwrap();
                assert!(rel_err(&got, &want) < 1e-6, "[O, K] {rows} {band}");
                let got = linear::dense_int8(&x, &qt, &scales_t, true, band).unwrap();
                assert!(rel_err(&got, &want) < 1e-6, "[K, O] {rows} {band}");
            }
        }
        let x = filled(&[3, k], 9);
        let want = x.matmul(&dequantized.t().unwrap()).unwrap();
        let got = linear_int8_inference(&qt, &scales_t, true, &x).unwrap();
        assert!(rel_err(&got, &want) < 1e-6);
    }
}

/// AdamW's composition of candle's ops, as the trainer ran it before the fused
/// update (and still runs it off the CPU).
fn composed_adamw(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: &AdamWStep) -> [Tensor; 3] {
    let g = match s.grad_scale {
        Some(k) => (g * k).unwrap(),
        None => g.clone(),
    };
    let p = (p * s.decay).unwrap();
    let m = ((m * s.beta1).unwrap() + (&g * (1.0 - s.beta1)).unwrap()).unwrap();
    let v = ((v * s.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - s.beta2)).unwrap()).unwrap();
    let denom = ((v.sqrt().unwrap() / s.bias2.sqrt()).unwrap() + s.eps).unwrap();
    let update = (m.div(&denom).unwrap() * s.step_size).unwrap();
    [(p - update).unwrap(), m, v]
}

#[test]
fn fused_adamw_gives_the_compositions_bits() {
    // Ragged: not a multiple of the vector width nor of a task's chunk.
    let shape = [3, 70_001];
    for (t, scale) in [(1, None), (7, Some(0.37))] {
        let (p0, g) = (filled(&shape, 1), filled(&shape, 2));
        let (m, v) = (filled(&shape, 3), filled(&shape, 4).sqr().unwrap());
        let s = AdamWStep {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-10,
            decay: 1.0 - 2e-5 * 0.03,
            bias2: 1.0 - 0.999f64.powi(t),
            step_size: 2e-5 / (1.0 - 0.9f64.powi(t)),
            grad_scale: scale,
        };
        let expected = composed_adamw(&p0, &g, &m, &v, &s);
        let p = Var::from_tensor(&p0).unwrap();
        let (m1, v1) = adamw_update(p.as_tensor(), &g, &m, &v, &s)
            .unwrap()
            .expect("the CPU path");
        for (got, want) in [p.as_tensor(), &m1, &v1].into_iter().zip(&expected) {
            let (got, want) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
            let bits = |t: &Tensor| {
                t.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert!(
                bits(&got) == bits(&want),
                "step {t}: not the composition's bits"
            );
        }
    }
    // Off the fused path: a strided gradient is left to the caller.
    let p = Var::from_tensor(&filled(&[4, 6], 5)).unwrap();
    let g = filled(&[6, 4], 6).t().unwrap();
    let (m, v) = (filled(&[4, 6], 7), filled(&[4, 6], 8).sqr().unwrap());
    let s = AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        decay: 1.0,
        bias2: 0.001,
        step_size: 1e-3,
        grad_scale: None,
    };
    assert!(adamw_update(p.as_tensor(), &g, &m, &v, &s)
        .unwrap()
        .is_none());
}

#[test]
fn fast_exp_is_within_a_few_ulp_of_exp() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.0 * i as f32 / 200_000.0;
        let exact = (x as f64).exp();
        worst = worst.max((activation::exp_f32(x) as f64 - exact).abs() / exact);
    }
    assert!(worst < 4e-7, "relative error {worst:e}");
    assert_eq!(activation::exp_f32(0.0), 1.0);
    assert_eq!(activation::exp_f32(-1000.0), activation::exp_f32(-87.0));
}
