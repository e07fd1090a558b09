//! Where and in what precision models run: the `dtype` and `device` inputs every
//! model loader declares, and what `auto` means (the CLI's `--device`).

use candle_core::{DType, Device};
use pixart_models::weights::LoadError;
use pixart_runtime::{InputSpec, Inputs, NodeError, PortType};
use std::path::Path;
use std::sync::OnceLock;

static DEFAULT_DEVICE: OnceLock<String> = OnceLock::new();

/// The device `auto` means: set once by the CLI's `--device`, CPU otherwise.
pub fn set_default_device(name: &str) {
    let _ = DEFAULT_DEVICE.set(name.to_string());
}

pub fn device(name: &str) -> Result<Device, String> {
    let name = match name {
        "auto" => DEFAULT_DEVICE.get().map(String::as_str).unwrap_or("cpu"),
        other => other,
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        // One GPU per rank when a launcher started several (`mpirun`, `srun`).
        "cuda" => cuda(crate::distributed::local_gpu()),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(format!("unknown device {other:?} (cpu, cuda, cuda:N)")),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device, String> {
    Device::new_cuda(ordinal).map_err(|e| {
        format!("cannot use CUDA device {ordinal}: {e} (build pixart with `--features cuda` on a machine with the CUDA toolkit)")
    })
}

pub fn dtype(name: &str) -> Result<DType, String> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("unknown dtype {other:?} (f32, f16, bf16)")),
    }
}

/// candle's CPU matmul has no bf16 kernel: refuse the pair up front.
pub fn check_dtype_device(path: &Path, dtype: DType, device: &Device) -> Result<(), LoadError> {
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(LoadError::file(
            path,
            "bf16 needs a GPU (candle's CPU matmul has no bf16 kernel); use f32 or f16 on the CPU",
        ));
    }
    Ok(())
}

pub fn dtype_input() -> InputSpec {
    InputSpec::new("dtype", PortType::enum_of(&["f32", "f16", "bf16"]))
        .default("f32")
        .describe("Weights and compute precision (bf16: GPU only).")
}

pub fn device_input() -> InputSpec {
    InputSpec::new("device", PortType::enum_of(&["auto", "cpu", "cuda"]))
        .default("auto")
        .describe("auto: what `pixart run --device` chose (cpu by default).")
}

/// The node's `dtype` and `device` inputs, resolved.
pub fn dtype_device(inputs: &Inputs) -> Result<(DType, Device), NodeError> {
    let dtype = dtype(inputs.str("dtype")?).map_err(|e| NodeError::input("dtype", e))?;
    let device = device(inputs.str("device")?).map_err(|e| NodeError::input("device", e))?;
    Ok((dtype, device))
}

/// How a T5 encoder keeps its projection weights (q, k, v, o and the
/// feed-forward: nearly all of its parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextWeights {
    /// In `dtype`; but bf16 weights stay bf16 under f32 arithmetic on the CPU
    /// (widening them is exact, so nothing changes but the memory).
    Auto,
    /// Rounded to bf16 under f32 arithmetic on the CPU: half the memory of f32
    /// (T5-XXL: 9.5 GB instead of 19), outputs within bf16's rounding of f32's.
    Bf16,
    /// 8-bit with a scale per output and 32 inputs under f32 arithmetic on the
    /// CPU: under a third of f32's memory (T5-XXL: 6.2 GB peak), at a larger
    /// error than bf16 (BENCHMARKS.md states it).
    Int8,
}

impl TextWeights {
    /// The choice named `name` (auto, bf16, int8).
    pub fn parse(name: &str) -> Result<TextWeights, String> {
        match name {
            "auto" => Ok(TextWeights::Auto),
            "bf16" => Ok(TextWeights::Bf16),
            "int8" => Ok(TextWeights::Int8),
            other => Err(format!("unknown choice {other:?} (auto, bf16, int8)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TextWeights::Auto => "auto",
            TextWeights::Bf16 => "bf16",
            TextWeights::Int8 => "int8",
        }
    }
}

pub fn text_weights_input() -> InputSpec {
    InputSpec::new(
        "text_encoder_weights",
        PortType::enum_of(&["auto", "bf16", "int8"]),
    )
    .default("auto")
    .describe(
        "T5's projection weights: auto (as dtype; bf16 checkpoints stay bf16 on the CPU), \
         bf16 (half the memory of f32, arithmetic still f32) or int8 (8-bit with a scale per \
         32 inputs: under a third of f32's memory, a larger error); bf16 and int8 for f32 on the CPU.",
    )
}

/// The node's `text_encoder_weights` input, resolved.
pub fn text_weights(inputs: &Inputs) -> Result<TextWeights, NodeError> {
    TextWeights::parse(inputs.str("text_encoder_weights")?)
        .map_err(|e| NodeError::input("text_encoder_weights", e))
}

pub fn memory_input() -> InputSpec {
    InputSpec::new("memory", PortType::enum_of(&["keep", "low"]))
        .default("keep")
        .describe(
            "keep: load every model now and keep it (errors show here, reruns start at once). \
             low: each model loads when a node first needs it, and T5's weights are freed once \
             the run has encoded its prompts (loaded again when a later run encodes): T5 and the \
             transformer are never in memory together, as with diffusers' lazily mapped \
             checkpoints and `pipe.text_encoder = None` after encode_prompt.",
        )
}

/// Whether the memory choice `name` is the low-memory way (keep, low).
pub fn parse_memory(name: &str) -> Result<bool, String> {
    match name {
        "keep" => Ok(false),
        "low" => Ok(true),
        other => Err(format!("unknown choice {other:?} (keep, low)")),
    }
}

/// Whether the node's `memory` input asks for the low-memory way.
pub fn low_memory(inputs: &Inputs) -> Result<bool, NodeError> {
    parse_memory(inputs.str("memory")?).map_err(|e| NodeError::input("memory", e))
}
