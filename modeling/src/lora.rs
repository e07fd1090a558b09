//! LoRA adapters of the PixArt transformer, read in the layouts they are
//! published in, and merged into a transformer's weights.
//!
//! Layouts (one `.safetensors` file, or a folder holding one):
//! - peft (`PeftModel.save_pretrained`, PixArt-Σ's LoRA training): keys
//!   `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, the rank and
//!   alpha in `adapter_config.json` beside them (`rank_pattern`,
//!   `alpha_pattern`, `use_rslora` honoured);
//! - diffusers pipelines: `transformer.<module>.lora_A/B.weight` (or the older
//!   `.lora.down/.lora.up`), the config in the safetensors metadata
//!   `lora_adapter_metadata`, else alpha = rank;
//! - kohya / sd-scripts: `lora_unet_<module with _ for .>.lora_down/.lora_up.weight`
//!   with a `.alpha` per module.
//!
//! A module's update is `scale · up · down` with `scale = alpha / r` (`alpha / √r`
//! for rank-stabilised LoRA), times the strength it is applied at.

use crate::weights::LoadError;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One adapted module: `down` is `[r, in]` (`[r, in, k, k]` for a convolution),
/// `up` is `[out, r]` (`[out, r, 1, 1]`).
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The module's name: diffusers' (`transformer_blocks.0.attn1.to_q`), or with
    /// `_` for `.` in the kohya layout until [`apply`] resolves it.
    pub module: String,
    pub down: Tensor,
    pub up: Tensor,
    /// alpha / r (or alpha / √r).
    pub scale: f64,
}

#[derive(Clone, Debug)]
pub struct Lora {
    pub modules: Vec<LoraModule>,
    /// `peft`, `diffusers` or `kohya`.
    pub layout: &'static str,
    /// The kohya layout names modules with `_` for `.`.
    underscored: bool,
}

/// What peft's `adapter_config.json` (or diffusers' metadata) says of the scales.
#[derive(Debug, Default, serde::Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    #[serde(default)]
    lora_alpha: Option<f64>,
    /// In the file's order: peft takes the first pattern that matches.
    #[serde(default, deserialize_with = "in_order")]
    alpha_pattern: Vec<(String, f64)>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

impl AdapterConfig {
    /// peft's rule: the first pattern that, as a regular expression, matches
    /// the end of the module's name on a `.` boundary (`(.*\.)?(pattern)$`).
    fn alpha(&self, module: &str) -> Option<f64> {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| {
                regex::Regex::new(&format!("^(.*\\.)?({p})$"))
                    .map(|re| re.is_match(module))
                    .unwrap_or(module == p)
            })
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
    }
}

/// A JSON object's entries in the order the file has them.
fn in_order<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<(String, f64)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of module patterns to numbers")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry::<String, f64>()? {
                out.push(entry);
            }
            Ok(out)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
    }
    d.deserialize_any(Entries)
}

const PREFIXES: [&str; 4] = [
    "base_model.model.",
    "unet.base_model.model.",
    "transformer.",
    "diffusion_model.",
];
const KOHYA_PREFIXES: [&str; 2] = ["lora_unet_", "lora_transformer_"];
const DOWN: [&str; 3] = [".lora_A.weight", ".lora_down.weight", ".lora.down.weight"];
const UP: [&str; 3] = [".lora_B.weight", ".lora_up.weight", ".lora.up.weight"];

impl Lora {
    /// Reads a LoRA file, or the folder peft or diffusers saved it in.
    pub fn load(path: &Path) -> Result<Lora, LoadError> {
        let (file, config_file) = if path.is_dir() {
            let file = [
                "adapter_model.safetensors",
                "pytorch_lora_weights.safetensors",
            ]
            .iter()
            .map(|n| path.join(n))
            .find(|f| f.is_file())
            .ok_or_else(|| {
                LoadError::file(
                    path,
                    "no adapter_model.safetensors (peft) or pytorch_lora_weights.safetensors \
                         (diffusers) in this folder",
                )
            })?;
            let config = path.join("adapter_config.json");
            (file, config.is_file().then_some(config))
        } else {
            // peft's weights named on their own: their config is beside them.
            let config = path
                .parent()
                .map(|d| d.join("adapter_config.json"))
                .filter(|c| c.is_file());
            (path.to_path_buf(), config)
        };
        let told = read_config(&file, config_file.as_deref())?;
        let configured = told.is_some();
        let config = told.unwrap_or_default();
        if config.use_dora {
            return Err(LoadError::file(
                &file,
                "a DoRA adapter (use_dora): only plain LoRA can be applied",
            ));
        }
        if let Some(kind) = config.peft_type.as_deref().filter(|k| *k != "LORA") {
            return Err(LoadError::file(
                &file,
                format!("a {kind} adapter: only LoRA can be applied"),
            ));
        }
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut underscored = false;
        let mut peft_keys = false;
        let mut layout = if config_file.is_some() {
            "peft"
        } else {
            "diffusers"
        };
        crate::safetensors_reader::for_each_tensor(&file, |name, t| {
            peft_keys |= name.starts_with("base_model.model.");
            let (module, kind) = match split_key(&name) {
                Some((module, kind, kohya)) => {
                    if kohya {
                        underscored = true;
                        layout = "kohya";
                    }
                    (module, kind)
                }
                None => {
                    unknown.push(name);
                    return Ok(());
                }
            };
            let entry = parts.entry(module).or_default();
            match kind {
                Part::Down => entry.down = Some(t),
                Part::Up => entry.up = Some(t),
                Part::Alpha => {
                    let alpha = t
                        .to_dtype(DType::F64)
                        .and_then(|a| a.flatten_all())
                        .and_then(|a| a.to_vec1::<f64>())
                        .map_err(|e| format!("tensor {name}: {e}"))?;
                    entry.alpha = alpha.first().copied();
                }
            }
            Ok(())
        })
        .map_err(|e| LoadError::file(&file, format!("not a readable safetensors file: {e}")))?;
        // peft keeps alpha in its config alone: without it the scale is a guess.
        if !configured && !underscored && peft_keys {
            return Err(LoadError::file(
                &file,
                "peft's weights without their adapter_config.json (its lora_alpha sets the \
                 scale): keep the file in its folder",
            ));
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(LoadError::file(
                &file,
                format!(
                    "not LoRA weights this loader knows ({} keys): {}",
                    unknown.len(),
                    list(&unknown)
                ),
            ));
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (module, p) in parts {
            let (Some(down), Some(up)) = (p.down, p.up) else {
                return Err(LoadError::file(
                    &file,
                    format!("{module}: needs both its down (lora_A) and up (lora_B) weights"),
                ));
            };
            let r = down.dims().first().copied().unwrap_or(0);
            if r == 0 || up.dims().get(1) != Some(&r) || up.rank() != down.rank() {
                return Err(LoadError::file(
                    &file,
                    format!(
                        "{module}: down {:?} and up {:?} do not share a rank",
                        down.dims(),
                        up.dims()
                    ),
                ));
            }
            let alpha = p
                .alpha
                .or_else(|| config.alpha(&module))
                .unwrap_or(r as f64);
            let scale = if config.use_rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            };
            modules.push(LoraModule {
                module,
                down,
                up,
                scale,
            });
        }
        if modules.is_empty() {
            return Err(LoadError::file(&file, "holds no LoRA weights"));
        }
        Ok(Lora {
            modules,
            layout,
            underscored,
        })
    }

    /// Bytes of its tensors.
    pub fn bytes(&self) -> usize {
        self.modules
            .iter()
            .map(|m| (m.down.elem_count() + m.up.elem_count()) * m.down.dtype().size_in_bytes())
            .sum()
    }
}

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

enum Part {
    Down,
    Up,
    Alpha,
}

/// A key's module, what it holds, and whether it is kohya's underscored name.
fn split_key(name: &str) -> Option<(String, Part, bool)> {
    let (rest, kohya) = match KOHYA_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
        Some(rest) => (rest, true),
        None => (
            PREFIXES
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .unwrap_or(name),
            false,
        ),
    };
    let found = |suffixes: &[&str], part: fn() -> Part| {
        suffixes
            .iter()
            .find_map(|s| rest.strip_suffix(s))
            .map(|m| (m.to_string(), part(), kohya))
    };
    found(&DOWN, || Part::Down)
        .or_else(|| found(&UP, || Part::Up))
        .or_else(|| found(&[".alpha"], || Part::Alpha))
        .filter(|(m, _, _)| !m.is_empty())
}

/// The adapter's config: `adapter_config.json` beside it, else diffusers'
/// `lora_adapter_metadata` (its keys under `transformer.` in a pipeline's file);
/// `None` when neither is there.
fn read_config(
    file: &Path,
    config_file: Option<&Path>,
) -> Result<Option<AdapterConfig>, LoadError> {
    if let Some(path) = config_file {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::file(path, e))?;
        return crate::weights::parse_json(path, &text).map(Some);
    }
    let meta = crate::safetensors_reader::metadata(file)
        .map_err(|e| LoadError::file(file, format!("not a readable safetensors file: {e}")))?;
    let Some(raw) = meta.get("lora_adapter_metadata") else {
        return Ok(None);
    };
    let value: serde_json::Value = crate::weights::parse_json(file, raw)?;
    let object = value.as_object().cloned().unwrap_or_default();
    let prefixed = object.keys().any(|k| k.starts_with("transformer."));
    let config: serde_json::Map<String, serde_json::Value> = object
        .into_iter()
        .filter_map(|(k, v)| match k.strip_prefix("transformer.") {
            Some(rest) => Some((rest.to_string(), v)),
            None if !prefixed => Some((k, v)),
            None => None,
        })
        .collect();
    serde_json::from_value(serde_json::Value::Object(config))
        .map(Some)
        .map_err(|e| LoadError::file(file, format!("lora_adapter_metadata: {e}")))
}

fn list(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(12).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// `weights` with each LoRA's update added at its strength:
/// `W + Σ strength · scale · up · down`, computed in f32 and stored in each
/// weight's own dtype. Only the adapted weights are new tensors; the rest are
/// the same tensors as in `weights`. A module the weights do not have, or of
/// another shape, is an error that lists them all.
pub fn apply(
    weights: &HashMap<String, Tensor>,
    loras: &[(&Lora, f64)],
) -> Result<HashMap<String, Tensor>, String> {
    // kohya names modules with `_` for `.`: look them up by that spelling.
    let by_underscores: HashMap<String, &str> = weights
        .keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .map(|m| (m.replace('.', "_"), m))
        .collect();
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for (lora, strength) in loras {
        for m in &lora.modules {
            let module = if lora.underscored {
                match by_underscores.get(&m.module) {
                    Some(dotted) => dotted.to_string(),
                    None => {
                        unmatched.push(m.module.clone());
                        continue;
                    }
                }
            } else {
                m.module.clone()
            };
            let name = format!("{module}.weight");
            let Some(w) = weights.get(&name) else {
                unmatched.push(module);
                continue;
            };
            let delta =
                update(m, w.dims(), strength * m.scale).map_err(|e| format!("{module}: {e}"))?;
            let sum = match sums.remove(&name) {
                Some(s) => (s + delta).map_err(|e| e.to_string())?,
                None => delta,
            };
            sums.insert(name, sum);
        }
    }
    if !unmatched.is_empty() {
        unmatched.sort();
        unmatched.dedup();
        return Err(format!(
            "the transformer has no module the LoRA names ({}): {}",
            unmatched.len(),
            list(&unmatched)
        ));
    }
    let mut merged = weights.clone();
    for (name, delta) in sums {
        let w = &weights[&name];
        let sum = delta
            .to_device(w.device())
            .and_then(|d| w.to_dtype(DType::F32)? + d)
            .and_then(|s| s.to_dtype(w.dtype()))
            .map_err(|e| format!("{name}: {e}"))?;
        merged.insert(name, sum);
    }
    Ok(merged)
}

/// `factor · up · down`, shaped like the weight (`dims`), in f32 on the CPU.
fn update(m: &LoraModule, dims: &[usize], factor: f64) -> candle_core::Result<Tensor> {
    let r = m.down.dim(0)?;
    let out = m.up.dim(0)?;
    let down = m
        .down
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((r, ()))?;
    let up =
        m.up.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((out, r))?;
    let delta = up.matmul(&down)?;
    if delta.elem_count() != dims.iter().product::<usize>() || dims.first() != Some(&out) {
        candle_core::bail!(
            "the LoRA's update is {:?}, the weight {dims:?}",
            delta.dims()
        );
    }
    (delta * factor)?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// peft's rule: patterns are regular expressions on the end of the name, the
    /// first in the file's order wins.
    #[test]
    fn alpha_patterns_match_as_peft_matches_them() {
        let config: AdapterConfig = serde_json::from_str(
            r#"{"lora_alpha": 8, "alpha_pattern": {"transformer_blocks\\.(0|1)\\.attn1\\.to_q": 2, "to_q": 3, "attn1.to_q": 4}}"#,
        )
        .unwrap();
        assert_eq!(config.alpha("transformer_blocks.1.attn1.to_q"), Some(2.0));
        assert_eq!(config.alpha("transformer_blocks.5.attn1.to_q"), Some(3.0));
        assert_eq!(config.alpha("transformer_blocks.5.attn2.to_q"), Some(3.0));
        assert_eq!(config.alpha("transformer_blocks.5.attn2.to_k"), Some(8.0));
        assert_eq!(config.alpha("transformer_blocks.5.attn2.xto_q"), Some(8.0));
    }
}
