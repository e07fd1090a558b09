//! `pixart bench`: the runtime's own cost per node, measured on generated graphs
//! of nodes that do nothing, so only parsing, validation, scheduling, caching and
//! events are timed; and the models' speed (one transformer forward, one training
//! step, captioning, a whole pipeline run), each with a PyTorch script under
//! `scripts/` for the same job.

mod pipeline;
mod text;

use anyhow::Result;
use clap::{Args, ValueEnum};
use pixart_runtime::executor::{CachePolicy, Executor, RunOptions};
use pixart_runtime::workflow::{load_workflow, LoadOptions};
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Registry, Value,
};
use std::fmt::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure: the runtime's per-node overhead, or one PixArt transformer
    /// forward (the benchmark config; compare with scripts/bench_dit_torch.py).
    #[arg(value_enum, default_value_t = Target::Runtime)]
    target: Target,
    /// Nodes in the generated graph.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Graph shape.
    #[arg(long, value_enum, default_value_t = Shape::Layered)]
    shape: Shape,
    /// Measured repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Device for `dit`: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// For `plugins`: the testkit plugin (built by the tests from
    /// plugins/examples/testkit).
    #[arg(
        long,
        default_value = "target/wasm-plugins/wasm32-unknown-unknown/release/testkit.wasm"
    )]
    plugin: std::path::PathBuf,
    /// For `caption`: the LLaVA folder; for `pipeline`: the PixArt pipeline folder
    /// (tests/fixtures/generate_real_scale.py writes full-size ones).
    #[arg(long, default_value = "/tmp/llava-mid")]
    model: std::path::PathBuf,
    /// For `pipeline`: image side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// For `pipeline`: sampler steps (DPM-Solver++).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// For `pipeline`: classifier-free guidance (a batch of 2 above 1).
    #[arg(long, default_value_t = 4.5)]
    guidance: f64,
    /// For `pipeline`: weights and compute precision (f32, f16; bf16 on a GPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// For `pipeline`: T5's projection weights (auto, or bf16: half the memory,
    /// f32 arithmetic).
    #[arg(long, default_value = "auto")]
    text_weights: String,
    /// For `pipeline`: keep (load every model first) or low (each model when
    /// first needed, T5 freed after encoding), as `pixart.load`'s `memory`.
    #[arg(long, default_value = "keep")]
    memory: String,
    /// For `text`: outputs to measure the error against (scripts/bench_text_torch.py --save).
    #[arg(long)]
    reference: Option<std::path::PathBuf>,
    /// For `caption`: new tokens per generation.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// For `train`: the transformer (`dit`: the benchmark config, 12 blocks 384
    /// wide; `xl`: PixArt-XL/2, 28 blocks 1152 wide).
    #[arg(long, default_value = "dit")]
    train_config: String,
    /// For `train`: train a LoRA of this rank on the attention projections
    /// (to_q, to_k, to_v, to_out.0) instead of the whole transformer.
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    /// For `train`: the batch in this many micro-batches (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// For `train`: activation checkpointing of the transformer blocks.
    #[arg(long)]
    grad_checkpoint: bool,
    /// For `train`: samples per step (the benchmark inputs repeated).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// For `train`: image pixels (latents of size / 8; 512 for PixArt-XL-2-512).
    #[arg(long, default_value_t = 256)]
    train_size: usize,
    /// For `train`: `bf16` computes the transformer in bfloat16 from f32 master
    /// weights (`train.pixart`'s `mixed_precision`; for GPUs).
    #[arg(long, default_value = "no")]
    mixed_precision: String,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Target {
    Runtime,
    Dit,
    /// One training step of the `dit` config: forward, loss, backward, clip, AdamW
    /// (compare with scripts/bench_train_torch.py).
    Train,
    /// The plugin boundary: a 4 MiB f32 tensor into a plugin and back, against a
    /// memcpy of the same size, and the cost of calling an empty plugin node.
    Plugins,
    /// Greedy LLaVA captioning: prefill and decode tokens/s of `--model`
    /// (compare with scripts/bench_llava_torch.py, which writes that folder).
    Caption,
    /// A whole txt2img run of the pipeline folder `--model`: load, T5, each
    /// sampler step, VAE decode, peak memory, as JSON (compare with
    /// scripts/bench_pipeline_torch.py on the same folder).
    Pipeline,
    /// The T5 encoder of `--model` (a folder with tokenizer/ and text_encoder/,
    /// e.g. a pipeline folder): load, encode, peak memory, and the error against
    /// `--reference` (compare with scripts/bench_text_torch.py).
    Text,
    /// A LoRA of rank `--lora-rank` (default 16) on PixArt-XL's attention
    /// projections, applied two ways: merged into the weights once, against
    /// adding x·Aᵀ·Bᵀ to every product on the fly, at `--size` px.
    Lora,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Shape {
    /// Each node reads the previous one: no parallelism.
    Chain,
    /// Layers of 100 nodes, each reading two nodes of the layer before.
    Layered,
}

struct NoOp {
    spec: NodeSpec,
}

impl NoOp {
    fn new(name: &str, inline: bool) -> NoOp {
        let mut spec = NodeSpec::new(name, 1)
            .category("bench")
            .input(InputSpec::new("a", PortType::Int).optional())
            .input(InputSpec::new("b", PortType::Int).optional())
            .output("out", PortType::Int, "");
        if inline {
            spec = spec.inline();
        }
        NoOp { spec }
    }
}

impl Node for NoOp {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, _inputs: Inputs) -> Result<Outputs, NodeError> {
        Ok(Outputs::one("out", Value::Int(0)))
    }
}

fn workflow_yaml(n: usize, shape: Shape, node_type: &str) -> String {
    let mut s = String::from("version: 1\nnodes:\n");
    for i in 0..n {
        let _ = write!(s, "  n{i}:\n    type: {node_type}\n");
        let (a, b) = match shape {
            Shape::Chain => (i.checked_sub(1), None),
            Shape::Layered => {
                let width = 100;
                let layer = i / width;
                if layer == 0 {
                    (None, None)
                } else {
                    let prev = (layer - 1) * width;
                    (Some(prev + i % width), Some(prev + (i + 1) % width))
                }
            }
        };
        if a.is_some() || b.is_some() {
            s.push_str("    inputs:\n");
            if let Some(a) = a {
                let _ = writeln!(s, "      a: ${{n{a}.out}}");
            }
            if let Some(b) = b {
                let _ = writeln!(s, "      b: ${{n{b}.out}}");
            }
        }
    }
    s
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn per_node(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    match args.target {
        Target::Dit => return dit(args.repeat.max(1), &args.device),
        Target::Train => return train(&args),
        Target::Plugins => return plugins(&args.plugin, args.repeat.max(1)),
        Target::Caption => return caption(&args.model, args.tokens.max(2), args.repeat.max(1)),
        Target::Pipeline => return pipeline::run(&args),
        Target::Text => return text::run(&args),
        Target::Lora => return lora(&args),
        Target::Runtime => {}
    }
    let n = args.nodes.max(1);
    let repeat = args.repeat.max(1);
    let mut registry = Registry::new();
    registry.register(Arc::new(NoOp::new("bench.noop", true)))?;
    registry.register(Arc::new(NoOp::new("bench.noop_thread", false)))?;
    println!(
        "pixart bench: {n} no-op nodes, shape {:?}, median of {repeat}",
        args.shape
    );
    println!("{:<44} {:>12} {:>12}", "phase", "total", "per node");
    for (node_type, label) in [
        ("bench.noop", "inline"),
        ("bench.noop_thread", "worker thread"),
    ] {
        let yaml = workflow_yaml(n, args.shape, node_type);
        let mut validate = Vec::new();
        let mut cold = Vec::new();
        let mut cached = Vec::new();
        for _ in 0..repeat {
            let t = Instant::now();
            let wf = load_workflow(&yaml, &registry, &LoadOptions::default())?;
            validate.push(t.elapsed());
            let executor = Executor::new(CachePolicy::default());
            for times in [&mut cold, &mut cached] {
                let t = Instant::now();
                let report = executor.run(&wf, RunOptions::default()).await?;
                times.push(t.elapsed());
                anyhow::ensure!(report.ok() && report.nodes.len() == n, "bench run failed");
            }
        }
        for (phase, times) in [
            ("parse + validate", validate),
            ("execute (cold cache)", cold),
            ("execute (all cached)", cached),
        ] {
            let d = median(times);
            println!(
                "{:<44} {:>10.2}ms {:>10.2}µs",
                format!("{phase}, {label}"),
                d.as_secs_f64() * 1e3,
                per_node(d, n)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The benchmark transformer: 12 layers, 6 heads × 64, 32×32 latents, patch 2,
/// caption_channels 4096, random weights.
fn bench_config() -> Result<pixart_models::pixart::Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "num_attention_heads": 6, "attention_head_dim": 64, "in_channels": 4, "out_channels": 8,
        "num_layers": 12, "sample_size": 32, "patch_size": 2, "caption_channels": 4096,
        "cross_attention_dim": 384, "norm_type": "ada_norm_single"
    }))?)
}

/// Sets every variable to N(0, 1/fan) noise (reproducible).
fn randomize(vars: &[pixart_runtime::candle_core::Var]) -> Result<()> {
    use pixart_nodes::noise::gaussian;
    use pixart_runtime::candle_core::Tensor;
    for var in vars {
        let t = var.as_tensor();
        let scale = 1.0 / (t.dims().last().copied().unwrap_or(1) as f32).sqrt();
        let values: Vec<f32> = gaussian(t.elem_count() as u64, t.elem_count())
            .iter()
            .map(|v| v * scale)
            .collect();
        var.set(&Tensor::from_vec(values, t.dims(), t.device())?)?;
    }
    Ok(())
}

/// The benchmark batch: latents `[2, 4, latent, latent]`, timesteps [999, 500], 120-token text with 20 and
/// 120 valid tokens.
fn bench_inputs(
    dev: &pixart_runtime::candle_core::Device,
    latent: usize,
) -> Result<[pixart_runtime::candle_core::Tensor; 4]> {
    use pixart_nodes::noise::gaussian;
    use pixart_runtime::candle_core::Tensor;
    let n = 2 * 4 * latent * latent;
    let x = Tensor::from_vec(gaussian(1, n), (2, 4, latent, latent), dev)?;
    let t = Tensor::new(&[999f32, 500.], dev)?;
    let text = Tensor::from_vec(gaussian(2, 2 * 120 * 4096), (2, 120, 4096), dev)?;
    let mask: Vec<f32> = (0..240)
        .map(|i| if (20..120).contains(&i) { 0.0 } else { 1.0 })
        .collect();
    let mask = Tensor::from_vec(mask, (2, 120), dev)?;
    Ok([x, t, text, mask])
}

/// The most GPU memory this process's allocations have held at once (the CUDA
/// default memory pool's high-water mark, which stream-ordered allocations such
/// as candle's come from; PyTorch's `max_memory_allocated`); `None` on the CPU.
#[cfg(feature = "cuda")]
fn gpu_max_allocated_mib(dev: &pixart_runtime::candle_core::Device) -> Option<f64> {
    use pixart_runtime::candle_core::cuda_backend::cudarc::driver::sys;
    let pixart_runtime::candle_core::Device::Cuda(cuda) = dev else {
        return None;
    };
    cuda.cuda_stream().synchronize().ok()?;
    let mut pool = std::ptr::null_mut();
    let mut high = 0u64;
    // SAFETY: the device handle is the context's own, the out-pointers are live
    // locals of the types the calls write (a pool handle, a cuuint64_t).
    unsafe {
        let device = cuda.cuda_stream().context().cu_device();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, device) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        if sys::cuMemPoolGetAttribute(pool, attr, (&mut high as *mut u64).cast())
            != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
    }
    Some(high as f64 / (1024.0 * 1024.0))
}

#[cfg(not(feature = "cuda"))]
fn gpu_max_allocated_mib(_: &pixart_runtime::candle_core::Device) -> Option<f64> {
    None
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// One forward of the benchmark transformer (batch 2, f32). Threads:
/// RAYON_NUM_THREADS (default: all cores).
fn dit(repeat: usize, device: &str) -> Result<ExitCode> {
    use pixart_models::pixart::PixArtTransformer;
    use pixart_runtime::candle_core::DType;

    let cfg = bench_config()?;
    let dev = pixart_nodes::device::device(device).map_err(anyhow::Error::msg)?;
    let varmap = candle_nn::VarMap::new();
    let model = PixArtTransformer::new(
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &cfg,
    )?;
    randomize(&varmap.all_vars())?;
    let [x, t, text, mask] = bench_inputs(&dev, 32)?;
    let threads = pixart_runtime::candle_core::utils::get_num_threads();
    let mut times = Vec::new();
    for i in 0..repeat + 2 {
        let start = Instant::now();
        let out = model.forward(&x, &t, &text, Some(&mask), None)?;
        out.sum_all()?.to_scalar::<f32>()?;
        if i >= 2 {
            times.push(start.elapsed());
        }
    }
    let min = *times.iter().min().unwrap_or(&Duration::ZERO);
    let med = median(times);
    println!(
        "{{\"bench\": \"pixart_dit_forward\", \"device\": \"{device}\", \"threads\": {threads}, \"matmul_precision\": \"{}\", \"repeat\": {repeat}, \"median_ms\": {:.2}, \"min_ms\": {:.2}}}",
        precision_label(),
        med.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}

/// The two ways of applying a LoRA to PixArt-XL's 112 attention projections
/// (28 blocks × q, k, v, out; 1152 × 1152): the one-time cost of merging
/// `W + s·B·A` and the memory the merged copies take, against the per-forward
/// cost of `x·Aᵀ·Bᵀ` beside every `x·Wᵀ` for the image tokens of `--size` px
/// (one CFG batch of 2).
fn lora(args: &BenchArgs) -> Result<ExitCode> {
    use pixart_runtime::candle_core::{DType, Device, Tensor};
    let rank = if args.lora_rank == 0 {
        16
    } else {
        args.lora_rank
    };
    let (d, modules) = (1152usize, 28 * 4);
    let tokens = 2 * (args.size / 16).pow(2);
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (d, d), &dev)?;
    let a = Tensor::randn(0f32, 0.02, (rank, d), &dev)?;
    let b = Tensor::randn(0f32, 0.02, (d, rank), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (tokens, d), &dev)?;
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<Duration> {
        let mut runs = Vec::new();
        for _ in 0..args.repeat.max(1) + 1 {
            let start = Instant::now();
            for _ in 0..modules {
                f()?;
            }
            runs.push(start.elapsed());
        }
        runs.remove(0);
        Ok(median(runs))
    };
    let merge = time(&|| Ok((&w + (b.matmul(&a)? * 2.0)?)?))?;
    let base = time(&|| Ok(x.matmul(&w.t()?)?))?;
    let on_the_fly = time(&|| Ok(x.matmul(&a.t()?)?.matmul(&b.t()?)?))?;
    let merged_mib = (modules * d * d * DType::F32.size_in_bytes()) as f64 / (1 << 20) as f64;
    println!(
        "{{\"bench\": \"lora\", \"rank\": {rank}, \"size\": {}, \"tokens\": {tokens}, \"modules\": {modules}, \"threads\": {}, \"merge_once_ms\": {:.1}, \"merged_copies_mib\": {merged_mib:.0}, \"base_products_ms\": {:.1}, \"on_the_fly_extra_ms\": {:.1}}}",
        args.size,
        pixart_runtime::candle_core::utils::get_num_threads(),
        merge.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3,
        on_the_fly.as_secs_f64() * 1e3,
    );
    Ok(ExitCode::SUCCESS)
}

/// One PixArt training step on the benchmark transformer: forward (differentiable
/// ops), the IDDPM loss, backward, gradient clipping and AdamW; batch 2, f32.
fn train(args: &BenchArgs) -> Result<ExitCode> {
    use pixart_nodes::training::loss::Diffusion;
    use pixart_nodes::training::model::{LoraSpec, Start, TrainModel};
    use pixart_nodes::training::optim::AdamW;
    use pixart_nodes::training::step::{share_gradients, Batch, Optimizer, StepPlan};
    use pixart_runtime::candle_core::Tensor;

    let (repeat, device) = (args.repeat.max(1), args.device.as_str());
    anyhow::ensure!(
        args.train_size >= 64 && args.train_size.is_multiple_of(16),
        "--train-size {}: a multiple of 16, at least 64",
        args.train_size
    );
    let latent = args.train_size / 8;
    let compute = pixart_nodes::training::model::mixed_precision(&args.mixed_precision)
        .map_err(|e| anyhow::anyhow!("--mixed-precision {e}"))?;
    let cfg = match args.train_config.as_str() {
        "dit" => bench_config()?,
        "xl" => serde_json::from_value(serde_json::json!({
            "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
            "out_channels": 8, "num_layers": 28, "sample_size": latent, "patch_size": 2,
            "caption_channels": 4096, "cross_attention_dim": 1152, "norm_type": "ada_norm_single"
        }))?,
        other => anyhow::bail!("--train-config {other}: dit or xl"),
    };
    let dev = pixart_nodes::device::device(device).map_err(anyhow::Error::msg)?;
    let mut tm = TrainModel::new(&cfg, Start::Scratch, 0, 0, &[], &dev)?;
    randomize(&tm.trainable())?;
    if args.lora_rank > 0 {
        let base: std::collections::HashMap<_, _> = tm.tensors().into_iter().collect();
        drop(tm);
        let spec = LoraSpec {
            rank: args.lora_rank,
            alpha: args.lora_rank as f64,
            targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
        };
        tm = TrainModel::new_lora(&cfg, &base, &spec, None, 0, &dev)?;
        // B starts at zero: give it values so the update is a real one.
        let b: Vec<_> = tm
            .params
            .iter()
            .filter(|p| p.name.ends_with("lora_B.weight"))
            .map(|p| p.var.clone())
            .collect();
        randomize(&b)?;
    }
    let vars = tm.trainable();
    let [x, _, text, mask] = bench_inputs(&dev, latent)?;
    // The two benchmark samples, repeated to `--batch`.
    let copies = args.batch.max(1).div_ceil(2);
    let take = |t: Tensor| -> Result<Tensor> {
        Ok(Tensor::cat(&vec![t; copies], 0)?.narrow(0, 0, args.batch.max(1))?)
    };
    let (x, text, mask) = (take(x)?, take(text)?, take(mask)?);
    let noise = (x.sin()? * 1.5)?;
    let plan = StepPlan {
        micro_batches: args.accumulate.max(1),
        checkpoint: args.grad_checkpoint,
    };
    let batch = Batch {
        x0: x,
        t: (0..args.batch.max(1)).map(|i| [999, 500][i % 2]).collect(),
        noise,
        text,
        mask,
        sizes: None,
        mse_weights: None,
        control: None,
    };
    let diffusion = Diffusion::pixart();
    let mut opt = Optimizer {
        adam: AdamW::pixart(&vars)?,
        vars,
        max_grad_norm: 0.01,
    };
    let trainable: usize = opt.vars.iter().map(|v| v.as_tensor().elem_count()).sum();
    let before = peak_rss_mib();
    let threads = pixart_runtime::candle_core::utils::get_num_threads();
    let mut times = Vec::new();
    for i in 0..repeat + 2 {
        let start = Instant::now();
        let b = batch.t.len();
        let copy = compute.map(|dtype| tm.compute_copy(dtype)).transpose()?;
        let model = copy.as_ref().map_or(&tm.model, |(m, _)| m);
        let (_, loss, mut grads) =
            share_gradients(model, None, &diffusion, &batch, b, &opt.vars, plan)?;
        drop(copy);
        opt.apply(&mut grads, 2e-5)?;
        anyhow::ensure!(loss.is_finite(), "loss {loss}");
        if i >= 2 {
            times.push(start.elapsed());
        }
    }
    let min = *times.iter().min().unwrap_or(&Duration::ZERO);
    let med = median(times);
    println!(
        "{{\"bench\": \"pixart_train_step\", \"config\": \"{}\", \"size\": {}, \"lora_rank\": {}, \"batch\": {}, \"accumulate\": {}, \"grad_checkpoint\": {}, \"mixed_precision\": \"{}\", \"trainable\": {trainable}, \"device\": \"{device}\", \"threads\": {threads}, \"matmul_precision\": \"{}\", \"repeat\": {repeat}, \"median_ms\": {:.2}, \"min_ms\": {:.2}, \"peak_rss_mib\": {:.0}, \"rss_before_steps_mib\": {before:.0}, \"gpu_max_allocated_mib\": {}}}",
        args.train_config,
        args.train_size,
        args.lora_rank,
        args.batch.max(1),
        plan.micro_batches,
        plan.checkpoint,
        args.mixed_precision,
        precision_label(),
        med.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3,
        peak_rss_mib(),
        gpu_max_allocated_mib(&dev).map_or("null".into(), |m| format!("{m:.0}")),
    );
    Ok(ExitCode::SUCCESS)
}

fn plugins(path: &std::path::Path, repeat: usize) -> Result<ExitCode> {
    use pixart_runtime::candle_core::{Device, Tensor};
    let plugin = pixart_plugins::PluginHost::new(None)
        .load(path, pixart_plugins::PluginOptions::default())
        .map_err(|e| anyhow::anyhow!("{e} (build it with `cargo test --test plugins`)"))?;
    let node = |name: &str| -> Result<Arc<pixart_plugins::PluginNode>> {
        plugin
            .nodes
            .iter()
            .find(|n| n.spec().name == format!("testkit/{name}"))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{} has no testkit/{name}", path.display()))
    };
    let (echo, noop) = (node("bench.echo")?, node("bench.noop")?);
    let ctx = NodeContext::detached(".", std::env::temp_dir());
    let n = 1 << 20; // 4 MiB of f32
    let bytes = (n * 4) as f64;
    let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let input = Tensor::from_vec(data.clone(), n, &Device::Cpu)?;
    let rounds = 20 * repeat;

    let mut copy = vec![0f32; n];
    let mut memcpy = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        copy.copy_from_slice(std::hint::black_box(&data));
        std::hint::black_box(&copy);
        memcpy.push(t.elapsed());
    }
    let mut echo_times = Vec::new();
    for _ in 0..rounds {
        let inputs = Inputs::from_pairs(echo.clone(), [("tensor", Value::Tensor(input.clone()))])?;
        let t = Instant::now();
        let out = echo.run(&ctx, inputs)?;
        echo_times.push(t.elapsed());
        anyhow::ensure!(out.0.len() == 1, "echo returned {:?}", out.0);
    }
    let mut noop_times = Vec::new();
    for _ in 0..500 * repeat {
        let inputs = Inputs::from_pairs(noop.clone(), [])?;
        let t = Instant::now();
        noop.run(&ctx, inputs)?;
        noop_times.push(t.elapsed());
    }
    let (memcpy, echo_t, noop_t) = (median(memcpy), median(echo_times), median(noop_times));
    let rate = |b: f64, d: Duration| b / d.as_secs_f64() / 1e6;
    println!("pixart bench plugins: {} (medians)", path.display());
    println!(
        "memcpy 4 MiB                      {:>9.3} ms  {:>8.0} MB/s",
        memcpy.as_secs_f64() * 1e3,
        rate(bytes, memcpy)
    );
    println!(
        "4 MiB tensor into the plugin and back {:>5.3} ms  {:>8.0} MB/s across the boundary (8 MiB crossed: {:.0}% of memcpy)",
        echo_t.as_secs_f64() * 1e3,
        rate(2.0 * bytes, echo_t),
        100.0 * rate(2.0 * bytes, echo_t) / rate(bytes, memcpy)
    );
    println!(
        "  (round trip vs one memcpy of 4 MiB: {:.0}%)",
        100.0 * memcpy.as_secs_f64() / echo_t.as_secs_f64()
    );
    println!(
        "empty plugin node, per call        {:>9.1} µs (a reused instance; limits, context and handles reset)",
        noop_t.as_secs_f64() * 1e6
    );
    Ok(ExitCode::SUCCESS)
}

fn caption(model: &std::path::Path, tokens: usize, repeat: usize) -> Result<ExitCode> {
    use pixart_nodes::captioner::{read_rgb, Captioner, Generation};
    use pixart_runtime::candle_core::{DType, Device};
    let captioner = Captioner::load(model, DType::F32, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{e} (write it with scripts/bench_llava_torch.py)"))?;
    let (rgb, w, h) = read_rgb(std::path::Path::new("tests/fixtures/reference/llava-2.png"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let prompt = "Describe this image and its style in a very detailed manner.";
    let prompt_tokens = captioner
        .input_ids(&captioner.prompt_text(prompt).map_err(anyhow::Error::msg)?)
        .map_err(anyhow::Error::msg)?
        .len();
    let run = |max_tokens| {
        let opts = Generation {
            max_tokens,
            temperature: 0.0,
            seed: 0,
        };
        let t = Instant::now();
        let c = captioner
            .caption(&rgb, w, h, prompt, &opts, |_, _| Ok(()))
            .map_err(anyhow::Error::msg)?;
        anyhow::Ok((t.elapsed(), c))
    };
    run(2)?; // warm-up
    let (mut prefill, mut decode, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeat {
        let (one, _) = run(1)?;
        let (all, c) = run(tokens)?;
        anyhow::ensure!(
            c.ids.len() == tokens,
            "stopped after {} tokens",
            c.ids.len()
        );
        prefill.push(one);
        decode.push((tokens - 1) as f64 / (all.as_secs_f64() - one.as_secs_f64()));
        ids = c.ids;
    }
    decode.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "prompt_tokens": prompt_tokens,
            "prefill_s": median(prefill).as_secs_f64(),
            "decode_tokens_per_s": decode[decode.len() / 2],
            "ids": ids,
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// The matmul precision the figures were measured at, as the JSON records it.
pub(crate) fn precision_label() -> String {
    use pixart_models::kernels::{bf16_engine, matmul_precision, MatmulPrecision};
    match matmul_precision() {
        MatmulPrecision::F32 => "f32".into(),
        MatmulPrecision::Bf16 => match bf16_engine() {
            Some(engine) => format!("bf16 ({engine})"),
            None => "f32 (bf16 asked for; no AMX)".into(),
        },
    }
}
