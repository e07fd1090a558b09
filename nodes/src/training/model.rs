//! The transformer as a set of named trainable variables: started from a
//! checkpoint's tensors or from scratch with PixArt-α's initialisation, with
//! parts optionally frozen, and (for class-conditional pre-training) a learned
//! table of class embeddings in caption space.

use super::rng::{Stream, TrainRng};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use pixart_models::pixart::{Config, PixArtTransformer};
use std::collections::HashMap;

/// The name of the class table among the parameters; it is not a transformer
/// weight and never goes into the diffusers checkpoint.
pub const CLASS_TABLE: &str = "class_embedding";

pub struct Param {
    pub name: String,
    pub var: Var,
    pub trainable: bool,
}

pub struct TrainModel {
    pub cfg: Config,
    pub model: PixArtTransformer,
    /// Every parameter, sorted by name (the class table included when present).
    pub params: Vec<Param>,
}

/// Where the starting values come from.
pub enum Start<'a> {
    Tensors(&'a HashMap<String, Tensor>),
    /// These tensors, and PixArt's initialisation for what they lack (modules a
    /// new config adds, e.g. the micro-condition embedders of a multi-scale stage).
    Extend(&'a HashMap<String, Tensor>),
    Scratch,
}

impl TrainModel {
    /// Builds the model in f32 on `device`; `classes` > 0 adds a class table
    /// (new unless `start` has one); names starting with one of `frozen` do not
    /// train. `seed` drives whatever is initialised rather than loaded.
    pub fn new(
        cfg: &Config,
        start: Start,
        seed: u64,
        classes: usize,
        frozen: &[String],
        device: &Device,
    ) -> Result<TrainModel> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = PixArtTransformer::new(vb.clone(), cfg)?;
        let caption = cfg.caption_channels();
        if classes > 0 {
            vb.get((classes, caption), CLASS_TABLE)?;
        }
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned variable map"))?
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, var)) in vars.iter().enumerate() {
            let shape = var.as_tensor().dims().to_vec();
            let mut rng = TrainRng::new(seed, Stream::Init, i as u64);
            let value = match &start {
                Start::Tensors(tensors) | Start::Extend(tensors) if tensors.contains_key(name) => {
                    let t = &tensors[name];
                    if t.dims() != shape.as_slice() {
                        candle_core::bail!(
                            "the starting checkpoint's `{name}` has shape {:?}, this model needs {shape:?}",
                            t.dims()
                        );
                    }
                    t.to_dtype(DType::F32)?.to_device(device)?
                }
                _ if name == CLASS_TABLE => {
                    // Like the official null caption: N(0, 1/C) in caption space.
                    let v = rng.normals(shape.iter().product());
                    (Tensor::from_vec(v, shape.as_slice(), device)? / (caption as f64).sqrt())?
                }
                Start::Tensors(_) => {
                    candle_core::bail!("the starting checkpoint has no tensor `{name}`")
                }
                Start::Scratch | Start::Extend(_) => {
                    let v = pixart_init(name, &shape, cfg, &mut rng);
                    Tensor::from_vec(v, shape.as_slice(), device)?
                }
            };
            var.set(&value)?;
        }
        let params = vars
            .into_iter()
            .map(|(name, var)| Param {
                trainable: !frozen.iter().any(|p| name.starts_with(p.as_str())),
                name,
                var,
            })
            .collect();
        Ok(TrainModel {
            cfg: cfg.clone(),
            model,
            params,
        })
    }

    pub fn trainable(&self) -> Vec<Var> {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.var.clone())
            .collect()
    }

    pub fn class_table(&self) -> Option<&Var> {
        self.params
            .iter()
            .find(|p| p.name == CLASS_TABLE)
            .map(|p| &p.var)
    }

    /// Current values by name (detached).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect()
    }

    /// Sets every parameter from `values` (a resumed checkpoint).
    pub fn load(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        for p in &self.params {
            let t = values.get(&p.name).ok_or_else(|| {
                candle_core::Error::msg(format!("the training state has no `{}`", p.name))
            })?;
            p.var.set(t)?;
        }
        Ok(())
    }
}

/// PixArt-α's `initialize_weights` in diffusers' names: Xavier-uniform linears
/// (fused q·k·v and k·v counted as one matrix, as the original's `qkv` and
/// `kv_linear`) with zero biases; the patch embedding as a linear over its
/// flattened kernel (its bias keeps PyTorch's conv default); N(0, 0.02) for the
/// timestep, micro-condition, t_block and caption MLPs; zero cross-attention
/// output and final linear; scale-shift tables N(0, 1/D).
pub fn pixart_init(name: &str, shape: &[usize], cfg: &Config, rng: &mut TrainRng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let d = cfg.hidden();
    let normal = |rng: &mut TrainRng, std: f32| -> Vec<f32> {
        rng.normals(n).into_iter().map(|x| x * std).collect()
    };
    let uniform = |rng: &mut TrainRng, bound: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let xavier = |rng: &mut TrainRng, fan_in: usize, fan_out: usize| {
        uniform(rng, (6.0 / (fan_in + fan_out) as f64).sqrt())
    };
    let zeros = || vec![0f32; n];

    if name.ends_with("scale_shift_table") {
        return normal(rng, 1.0 / (d as f32).sqrt());
    }
    if name == "pos_embed.proj.weight" {
        return xavier(rng, n / shape[0], shape[0]);
    }
    if name == "pos_embed.proj.bias" {
        let fan_in = cfg.in_channels * cfg.patch_size * cfg.patch_size;
        return uniform(rng, 1.0 / (fan_in as f64).sqrt());
    }
    if name.contains(".attn2.to_out.") || name.starts_with("proj_out.") {
        return zeros();
    }
    // KV compression starts as an average pool and an identity layer norm.
    if name.ends_with(".attn1.sr.weight") {
        let window = shape.last().copied().unwrap_or(1).pow(2);
        return vec![1.0 / window as f32; n];
    }
    if name.ends_with(".attn1.norm.weight") {
        return vec![1.0; n];
    }
    if name.ends_with(".bias") {
        return zeros();
    }
    let mlp_02 = name.starts_with("adaln_single.emb.")
        || name == "adaln_single.linear.weight"
        || name.starts_with("caption_projection.");
    if mlp_02 {
        return normal(rng, 0.02);
    }
    if shape.len() == 2 {
        let (rows, cols) = (shape[0], shape[1]);
        let fused_rows = if name.contains(".attn1.to_q.")
            || name.contains(".attn1.to_k.")
            || name.contains(".attn1.to_v.")
        {
            3 * rows
        } else if name.contains(".attn2.to_k.") || name.contains(".attn2.to_v.") {
            2 * rows
        } else {
            rows
        };
        return xavier(rng, cols, fused_rows);
    }
    normal(rng, 0.02)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Config {
        serde_json::from_value(serde_json::json!({
            "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
            "num_layers": 2, "sample_size": 8, "patch_size": 2, "caption_channels": 12,
            "cross_attention_dim": 16, "norm_type": "ada_norm_single"
        }))
        .unwrap()
    }

    fn stats(t: &Tensor) -> (f32, f32) {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn scratch_follows_pixart_initialisation_and_freezing_marks_parameters() {
        let cfg = tiny();
        let frozen = vec!["pos_embed".to_string()];
        let tm = TrainModel::new(&cfg, Start::Scratch, 7, 3, &frozen, &Device::Cpu).unwrap();
        let get = |name: &str| {
            tm.params
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        let zero = |name: &str| {
            let (m, s) = stats(get(name).var.as_tensor());
            assert!(m == 0.0 && s == 0.0, "{name} should start at zero");
        };
        // Zero-initialised: cross-attention output, final linear, every linear bias.
        zero("transformer_blocks.0.attn2.to_out.0.weight");
        zero("transformer_blocks.1.attn2.to_out.0.bias");
        zero("proj_out.weight");
        zero("proj_out.bias");
        zero("transformer_blocks.0.ff.net.0.proj.bias");
        // N(0, 0.02) for the timestep, t_block and caption MLPs.
        let (_, s) = stats(get("adaln_single.linear.weight").var.as_tensor());
        assert!((s - 0.02).abs() < 0.002, "t_block std {s}");
        let (_, s) = stats(get("caption_projection.linear_1.weight").var.as_tensor());
        assert!((s - 0.02).abs() < 0.004, "caption std {s}");
        // Xavier-uniform with the fused q·k·v fan: bound √(6 / (D + 3D)).
        let d = cfg.hidden() as f32;
        let q = get("transformer_blocks.0.attn1.to_q.weight")
            .var
            .as_tensor();
        let values = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let bound = (6.0 / (4.0 * d)).sqrt();
        assert!(
            max <= bound && max > 0.8 * bound,
            "q max {max}, bound {bound}"
        );
        // Scale-shift tables N(0, 1/D); the class table N(0, 1/C).
        let (_, s) = stats(get("scale_shift_table").var.as_tensor());
        assert!(
            (s - 1.0 / d.sqrt()).abs() < 0.1 / d.sqrt() * 3.0,
            "table std {s}"
        );
        assert_eq!(get(CLASS_TABLE).var.as_tensor().dims(), &[3, 12]);
        // Frozen by prefix; the rest trains.
        assert!(!get("pos_embed.proj.weight").trainable && !get("pos_embed.proj.bias").trainable);
        assert!(get("proj_out.weight").trainable);
        assert_eq!(tm.trainable().len(), tm.params.len() - 2);
        // The same seed gives the same model.
        let again = TrainModel::new(&cfg, Start::Scratch, 7, 3, &frozen, &Device::Cpu).unwrap();
        for (a, b) in tm.params.iter().zip(&again.params) {
            let (x, y) = (a.var.as_tensor(), b.var.as_tensor());
            let same = x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{}", a.name);
        }
    }
}
