//! `pixart bench text`: one T5 encoder on its own — load time, the time to encode
//! a prompt and the empty negative (PixArt's 120 tokens), peak RSS, and with
//! `--reference` the error against outputs scripts/bench_text_torch.py saved.

use super::pipeline::{round, text_weights, PROMPT};
use super::{peak_rss_mib, BenchArgs};
use anyhow::{Context, Result};
use pixart_nodes::pixart::load;
use pixart_nodes::pixart::nodes::encode_text;
use pixart_runtime::candle_core::{DType, Device, Tensor};
use std::process::ExitCode;
use std::time::Instant;

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let dtype = pixart_nodes::device::dtype(&args.dtype).map_err(anyhow::Error::msg)?;
    let device = pixart_nodes::device::device(&args.device).map_err(anyhow::Error::msg)?;
    let weights = text_weights(&args.text_weights)?;

    let start = Instant::now();
    let tokenizer = load::tokenizer(&args.model.join("tokenizer"))?;
    let encoder = load::text_encoder(&args.model.join("text_encoder"), dtype, weights, &device)?;
    let load_s = start.elapsed();

    let start = Instant::now();
    let mut outputs = Vec::new();
    for (name, text) in [("positive", PROMPT), ("negative", "")] {
        let tokens = tokenizer.sequence_length();
        let c = encode_text(&tokenizer, &encoder, text, tokens).map_err(anyhow::Error::msg)?;
        outputs.push((name, c.embeddings));
    }
    let t5_s = start.elapsed();

    let mut json = serde_json::json!({
        "bench": "text",
        "impl": "pixart-flow",
        "model": args.model.display().to_string(),
        "layers": encoder.config().num_layers,
        "dtype": args.dtype,
        "text_weights": args.text_weights,
        "device": args.device,
        "matmul_precision": super::precision_label(),
        "threads": pixart_runtime::candle_core::utils::get_num_threads(),
        "load_s": round(load_s),
        "t5_s": round(t5_s),
        "peak_rss_mib": peak_rss_mib().round(),
    });
    if let Some(path) = &args.reference {
        let reference = pixart_runtime::candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let (mut worst_abs, mut worst_rel) = (0f32, 0f32);
        for (name, got) in &outputs {
            let want = reference
                .get(*name)
                .with_context(|| format!("{}: no tensor {name:?}", path.display()))?;
            let (abs, rel) = errors(got, want)?;
            worst_abs = worst_abs.max(abs);
            worst_rel = worst_rel.max(rel);
        }
        json["max_abs_err"] = worst_abs.into();
        json["max_rel_err"] = worst_rel.into();
    }
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}

/// The largest absolute difference, and that relative to the reference's
/// largest magnitude.
fn errors(got: &Tensor, want: &Tensor) -> Result<(f32, f32)> {
    let got = got.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let want = want.to_dtype(DType::F32)?;
    anyhow::ensure!(
        got.dims() == want.dims(),
        "shape {:?}, reference {:?}",
        got.dims(),
        want.dims()
    );
    let abs = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = want
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .max(f32::MIN_POSITIVE);
    Ok((abs, abs / scale))
}
