//! `--matmul-precision bf16` on the default model: bf16 products stay within
//! bf16 rounding of the f32 run, and differ from it (they ran).
//! Its own test binary, because the precision is process-wide and the other
//! suites hold f32 results to 1e-4.

mod common;

use pixart_models::kernels::{
    bf16_engine, matmul_precision, set_matmul_precision, MatmulPrecision,
};
use pixart_models::pixart::SizeConditions;
use pixart_nodes::pixart::load;
use pixart_runtime::candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Deterministic values in [-1, 1) of a given shape.
fn filled(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Runs `f` in f32 and in bf16 products; returns both results.
fn both(f: impl Fn() -> Tensor) -> (Tensor, Tensor) {
    assert_eq!(matmul_precision(), MatmulPrecision::F32);
    let exact = f();
    set_matmul_precision(MatmulPrecision::Bf16);
    let rounded = f();
    set_matmul_precision(MatmulPrecision::F32);
    (exact, rounded)
}

/// bf16 keeps 8 significant bits: each operand is off by up to 2⁻⁹ of itself.
/// Through a handful of layers, each output stays within a few such roundings
/// of the largest output; 2⁻⁶ (four bf16 steps of 2⁻⁸) bounds that.
const BF16_TOLERANCE: f32 = 1.0 / 64.0;

fn check(what: &str, exact: &Tensor, rounded: &Tensor) {
    let err = common::rel_err(rounded, exact);
    let engine = bf16_engine();
    eprintln!(
        "{what}: bf16 products ({engine:?}) {err:e} from f32 (relative to the largest value)"
    );
    if engine.is_some() {
        assert!(
            err <= BF16_TOLERANCE,
            "{what}: {err:e} > {BF16_TOLERANCE:e}"
        );
        assert!(
            err > 1e-6,
            "{what}: no rounding at all: did bf16 products run?"
        );
    } else {
        // Without an engine the products stay f32, bit for bit.
        assert_eq!(err, 0.0, "{what}");
    }
}

#[test]
fn bf16_products_stay_within_bf16_rounding_of_f32() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/pixart-shapes");
    let den = load::transformer(&model.join("transformer"), DType::F32, &Device::Cpu).unwrap();
    let config = den.model.config();
    // The default model is trained with PixArt's size micro-conditions.
    let resolution = Tensor::new(&[[128f32, 128.0], [128.0, 128.0]], &Device::Cpu).unwrap();
    let aspect_ratio = Tensor::new(&[[1f32], [1.0]], &Device::Cpu).unwrap();
    let sizes = SizeConditions {
        resolution: &resolution,
        aspect_ratio: &aspect_ratio,
    };
    let (exact, rounded) = both(|| {
        den.model
            .forward(
                &filled(&[2, 4, 16, 16], 1),
                &Tensor::new(&[999f32, 300.0], &Device::Cpu).unwrap(),
                &filled(&[2, 12, config.caption_channels()], 2),
                Some(&Tensor::ones((2, 12), DType::F32, &Device::Cpu).unwrap()),
                config.additional_conditions().then_some(&sizes),
            )
            .unwrap()
    });
    check("transformer", &exact, &rounded);

    let vae = load::vae(&model.join("vae"), DType::F32, &Device::Cpu).unwrap();
    let (exact, rounded) = both(|| vae.decode(&filled(&[1, 4, 16, 16], 3)).unwrap());
    check("VAE decode", &exact, &rounded);
}
