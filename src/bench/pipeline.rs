//! `pixart bench pipeline`: one txt2img run of a pipeline folder, timed part by
//! part as a user's run spends it — loading, T5, every sampler step, the VAE —
//! with the process's peak memory. scripts/bench_pipeline_torch.py prints the
//! same fields for diffusers on the same folder.

use super::{median, peak_rss_mib, BenchArgs};
use anyhow::Result;
use pixart_nodes::device::TextWeights;
use pixart_nodes::pixart::latents;
use pixart_nodes::pixart::load::{self, PipelineFolder};
use pixart_nodes::pixart::nodes::encode_text;
use pixart_nodes::pixart::sample::{sample, Request};
use pixart_nodes::pixart::text_encoder::TextEncoder;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub(super) const PROMPT: &str = "a small cactus with a happy face in the sahara desert";

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let dtype = pixart_nodes::device::dtype(&args.dtype).map_err(anyhow::Error::msg)?;
    let device = pixart_nodes::device::device(&args.device).map_err(anyhow::Error::msg)?;
    let folder = PipelineFolder::open(&args.model)?;

    // `--memory low` loads as a workflow's `memory: low` does: each model when it
    // is first needed, T5 freed after encoding. `load_s` sums every load either way.
    let low = pixart_nodes::device::parse_memory(&args.memory)
        .map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    let mut load_s = Duration::ZERO;
    let timed = |load_s: &mut Duration, start: Instant| *load_s += start.elapsed();

    let start = Instant::now();
    let tokenizer = load::tokenizer(&folder.part("tokenizer"))?;
    let text_weights = text_weights(&args.text_weights)?;
    let slot = TextEncoder::load(
        &folder.part("text_encoder"),
        dtype,
        text_weights,
        &device,
        low,
    )?;
    let choice = load::scheduler(&folder.part("scheduler"))?;
    let load_models = || -> Result<_> {
        let den = load::transformer(&folder.part("transformer"), dtype, &device)?;
        let vae = load::vae(&folder.part("vae"), dtype, &device)?;
        Ok((den, vae))
    };
    let mut models = if low { None } else { Some(load_models()?) };
    timed(&mut load_s, start);
    let rss_loaded = peak_rss_mib();

    let start = Instant::now();
    let encoder = slot.get()?;
    timed(&mut load_s, start);
    let start = Instant::now();
    // The pipeline's prompt length: 120 tokens for PixArt-α, 300 for PixArt-Σ.
    let tokens = tokenizer.sequence_length();
    let positive = encode_text(&tokenizer, &encoder, PROMPT, tokens).map_err(anyhow::Error::msg)?;
    let negative = encode_text(&tokenizer, &encoder, "", tokens).map_err(anyhow::Error::msg)?;
    let t5_s = start.elapsed();
    drop(encoder);
    if low {
        // As the run does after its last encode.
        slot.release();
    }
    let (den, vae) = match models.take() {
        Some(m) => m,
        None => {
            let start = Instant::now();
            let m = load_models()?;
            timed(&mut load_s, start);
            m
        }
    };

    let steps = args.steps.max(1);
    let mut sampler = choice
        .config
        .start(&choice.sampler, steps)
        .map_err(anyhow::Error::msg)?;
    let request = Request {
        positive: &positive,
        negative: Some(&negative),
        guidance: args.guidance,
        width: args.size,
        height: args.size,
        seed: 0,
        latents: None,
        resolution_binning: true,
        vae_scale: vae.config().scale_factor(),
        init: None,
    };
    let mut step_times: Vec<Duration> = Vec::with_capacity(steps);
    let mut last = Instant::now();
    let z = sample(&den, sampler.as_mut(), &request, |_| {
        step_times.push(last.elapsed());
        last = Instant::now();
        Ok(())
    })?;
    let steps_s: Duration = step_times.iter().sum();

    let start = Instant::now();
    let image = latents::decode(&vae, &z)?;
    let vae_s = start.elapsed();
    let max = image.abs()?.max_all()?.to_scalar::<f32>()?;
    anyhow::ensure!(max.is_finite(), "the decoded image is not finite");

    let threads = pixart_runtime::candle_core::utils::get_num_threads();
    let json = serde_json::json!({
        "bench": "pipeline",
        "impl": "pixart-flow",
        "model": args.model.display().to_string(),
        "size": args.size,
        "steps": steps,
        "tokens": tokens,
        "dtype": args.dtype,
        "text_weights": args.text_weights,
        "memory": args.memory,
        "device": args.device,
        "matmul_precision": super::precision_label(),
        "threads": threads,
        "load_s": round(load_s),
        "t5_s": round(t5_s),
        "step_s": round(median(step_times)),
        "steps_s": round(steps_s),
        "vae_s": round(vae_s),
        "rss_after_load_mib": rss_loaded.round(),
        "peak_rss_mib": peak_rss_mib().round(),
    });
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}

/// The `--text-weights` choice.
pub(super) fn text_weights(name: &str) -> Result<TextWeights> {
    TextWeights::parse(name).map_err(|e| anyhow::anyhow!("--text-weights: {e}"))
}

pub(super) fn round(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
