//! The transformer as a set of named trainable variables: started from a
//! checkpoint's tensors or from scratch with PixArt-α's initialisation, with
//! parts optionally frozen, and (for class-conditional pre-training) a learned
//! table of class embeddings in caption space.

use super::rng::{Stream, TrainRng};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use pixart_models::pixart::{Adapters, Config, ControlNet, LowRank, PixArtTransformer, ADAPTABLE};
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
    /// The model the parameters are (full training), or the frozen base a LoRA
    /// adapts.
    pub model: PixArtTransformer,
    /// Every parameter, sorted by name (the class table included when present;
    /// with a LoRA, its `<module>.lora_A.weight` / `.lora_B.weight` alone).
    pub params: Vec<Param>,
    /// LoRA training: the frozen base weights and the adapted modules.
    pub lora: Option<LoraState>,
    /// ControlNet training: the network the parameters are (beside the frozen
    /// `model`).
    pub controlnet: Option<ControlNet>,
    /// ControlNet training: the frozen base's weights `model` was built from.
    controlnet_base: Option<HashMap<String, Tensor>>,
}

/// What a LoRA trains: `rank`, `alpha` (the update is `alpha/rank · B·A`) and
/// the modules, matched as peft's `target_modules` are (a module whose name is
/// one of them or ends with `.` and one of them).
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// peft's `adapter_config.json` for this LoRA (what peft and diffusers read).
    pub fn adapter_config(&self) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": self.targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": null,
            "base_model_name_or_path": null,
            "task_type": null,
            "inference_mode": true,
        })
    }
}

pub struct LoraState {
    pub spec: LoraSpec,
    base: HashMap<String, Tensor>,
    /// Adapted module names, in the order of their (A, B) parameters.
    modules: Vec<String>,
}

/// The name a LoRA parameter of `module` has (peft's, without its prefix).
pub fn lora_param(module: &str, up: bool) -> String {
    format!("{module}.lora_{}.weight", if up { "B" } else { "A" })
}

/// The choices of `mixed_precision`.
pub const MIXED_PRECISION: [&str; 2] = ["no", "bf16"];

/// The dtype a `mixed_precision` choice computes in: `None` for `no` (f32).
pub fn mixed_precision(name: &str) -> std::result::Result<Option<DType>, String> {
    match name {
        "no" => Ok(None),
        "bf16" => Ok(Some(DType::BF16)),
        other => Err(format!("{other:?}: one of {}", MIXED_PRECISION.join(", "))),
    }
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
        let vars = sorted_vars(&varmap)?;
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
            lora: None,
            controlnet: None,
            controlnet_base: None,
        })
    }

    /// A ControlNet for the frozen `base`, as PixArt-α's ControlNet-Transformer
    /// starts one: `copies` blocks copied from the base's first ones, and the
    /// `before_proj` / `after_proj` layers at zero, so training starts at the
    /// base model's output; or its values in `start` (a resumed checkpoint).
    pub fn new_controlnet(
        cfg: &Config,
        base: &HashMap<String, Tensor>,
        copies: usize,
        start: Option<&HashMap<String, Tensor>>,
        device: &Device,
    ) -> Result<TrainModel> {
        let base = f32_on(base, device)?;
        let model = PixArtTransformer::new(
            VarBuilder::from_tensors(base.clone(), DType::F32, device),
            cfg,
        )?;
        let varmap = VarMap::new();
        let net = ControlNet::new(
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            cfg,
            copies,
        )?;
        let vars = sorted_vars(&varmap)?;
        for (name, var) in &vars {
            let value = match start {
                Some(values) => values.get(name).cloned().ok_or_else(|| {
                    candle_core::Error::msg(format!("the training state has no `{name}`"))
                })?,
                None => match copied_from(name) {
                    Some(source) => base.get(&source).cloned().ok_or_else(|| {
                        candle_core::Error::msg(format!(
                            "the base transformer has no `{source}` to copy into `{name}`"
                        ))
                    })?,
                    None => var.as_tensor().zeros_like()?,
                },
            };
            if value.dims() != var.as_tensor().dims() {
                candle_core::bail!(
                    "`{name}` has shape {:?}, this ControlNet needs {:?}",
                    value.dims(),
                    var.as_tensor().dims()
                );
            }
            var.set(&value.to_dtype(DType::F32)?.to_device(device)?)?;
        }
        let params = vars
            .into_iter()
            .map(|(name, var)| Param {
                name,
                var,
                trainable: true,
            })
            .collect();
        Ok(TrainModel {
            cfg: cfg.clone(),
            model,
            params,
            lora: None,
            controlnet: Some(net),
            controlnet_base: Some(base),
        })
    }

    /// A LoRA on the frozen `base` weights: for every targeted linear `[out, in]`
    /// a trainable A `[rank, in]`, Kaiming-uniform as peft starts it (bound
    /// 1/√in), and B `[out, rank]` at zero, so training starts at the base
    /// model; or their values in `start` (a resumed checkpoint).
    pub fn new_lora(
        cfg: &Config,
        base: &HashMap<String, Tensor>,
        spec: &LoraSpec,
        start: Option<&HashMap<String, Tensor>>,
        seed: u64,
        device: &Device,
    ) -> Result<TrainModel> {
        let base = f32_on(base, device)?;
        let named = |module: &str, t: &str| module == t || module.ends_with(&format!(".{t}"));
        let mut modules: Vec<String> = base
            .iter()
            .filter(|(_, t)| t.rank() == 2)
            .filter_map(|(n, _)| n.strip_suffix(".weight"))
            .filter(|m| spec.targets.iter().any(|t| named(m, t)))
            .map(str::to_string)
            .collect();
        modules.sort();
        if modules.is_empty() {
            candle_core::bail!(
                "no linear layer of the transformer matches the LoRA targets {:?}",
                spec.targets
            );
        }
        // Training adds the update beside the blocks' projections (no merged
        // copy of their weights): those are the layers it can adapt.
        if let Some(other) = modules.iter().find(|m| {
            !m.starts_with("transformer_blocks.") || !ADAPTABLE.iter().any(|a| named(m, a))
        }) {
            candle_core::bail!(
                "`{other}`: LoRA training adapts the blocks' projections ({}) only",
                ADAPTABLE.join(", ")
            );
        }
        let mut params = Vec::with_capacity(2 * modules.len());
        for (i, module) in modules.iter().enumerate() {
            let (out, inp) = base[&format!("{module}.weight")].dims2()?;
            for (up, shape) in [(false, (spec.rank, inp)), (true, (out, spec.rank))] {
                let name = lora_param(module, up);
                let value = match start {
                    Some(values) => values
                        .get(&name)
                        .ok_or_else(|| {
                            candle_core::Error::msg(format!("the training state has no `{name}`"))
                        })?
                        .to_dtype(DType::F32)?
                        .to_device(device)?,
                    None if up => Tensor::zeros(shape, DType::F32, device)?,
                    None => {
                        let mut rng = TrainRng::new(seed, Stream::Init, i as u64);
                        let bound = 1.0 / (inp as f64).sqrt();
                        let v: Vec<f32> = (0..shape.0 * shape.1)
                            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                            .collect();
                        Tensor::from_vec(v, shape, device)?
                    }
                };
                if value.dims() != [shape.0, shape.1] {
                    candle_core::bail!(
                        "`{name}` has shape {:?}, this LoRA needs {shape:?}",
                        value.dims()
                    );
                }
                params.push(Param {
                    name,
                    var: Var::from_tensor(&value)?,
                    trainable: true,
                });
            }
        }
        // The update sits beside each adapted projection, reading the LoRA's
        // variables: the optimiser's in-place updates reach the model as they are.
        let scale = spec.alpha / spec.rank as f64;
        let adapters: Adapters = modules
            .iter()
            .zip(params.chunks(2))
            .map(|(m, ab)| {
                let low = LowRank {
                    a: ab[0].var.as_tensor().clone(),
                    b: ab[1].var.as_tensor().clone(),
                    scale,
                };
                (m.clone(), low)
            })
            .collect();
        let model = PixArtTransformer::new_adapted(
            VarBuilder::from_tensors(base.clone(), DType::F32, device),
            cfg,
            &adapters,
        )?;
        Ok(TrainModel {
            cfg: cfg.clone(),
            model,
            params,
            lora: Some(LoraState {
                spec: spec.clone(),
                base,
                modules,
            }),
            controlnet: None,
            controlnet_base: None,
        })
    }

    /// The base weights with a LoRA's values (`values` by parameter name, such
    /// as its EMA) merged in; the weights alone without a LoRA.
    pub fn merged_weights(
        &self,
        values: &HashMap<String, Tensor>,
    ) -> Result<Option<HashMap<String, Tensor>>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        let ordered = self
            .params
            .iter()
            .map(|p| {
                values
                    .get(&p.name)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::msg(format!("no value of `{}`", p.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(lora.merged(&ordered)?))
    }

    /// The model to compute a mixed-precision step with: the same parameters
    /// cast to `dtype` (bf16), while the variables themselves stay f32 master
    /// weights. The casts keep their graph, so the gradients of a loss computed
    /// through this copy reach the f32 variables in f32, as PyTorch's autocast
    /// gives them; frozen weights are cast without one. Make it again after each
    /// optimiser step (it holds the values of the step it was made at).
    pub fn compute_copy(&self, dtype: DType) -> Result<(PixArtTransformer, Option<ControlNet>)> {
        let cast = |p: &Param| {
            if p.trainable {
                p.var.as_tensor().to_dtype(dtype)
            } else {
                p.var.as_tensor().detach().to_dtype(dtype)
            }
        };
        let device = self.model.device();
        let frozen = |weights: &HashMap<String, Tensor>| -> Result<HashMap<String, Tensor>> {
            weights
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.detach().to_dtype(dtype)?)))
                .collect()
        };
        if let Some(lora) = &self.lora {
            let adapters: Adapters = lora
                .modules
                .iter()
                .zip(self.params.chunks(2))
                .map(|(m, ab)| {
                    let low = LowRank {
                        a: cast(&ab[0])?,
                        b: cast(&ab[1])?,
                        scale: lora.spec.alpha / lora.spec.rank as f64,
                    };
                    Ok((m.clone(), low))
                })
                .collect::<Result<_>>()?;
            let base = VarBuilder::from_tensors(frozen(&lora.base)?, dtype, device);
            return Ok((
                PixArtTransformer::new_adapted(base, &self.cfg, &adapters)?,
                None,
            ));
        }
        let own = self
            .params
            .iter()
            .filter(|p| p.name != CLASS_TABLE)
            .map(|p| Ok((p.name.clone(), cast(p)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        match &self.controlnet {
            Some(net) => {
                let base = self.controlnet_base.as_ref().ok_or_else(|| {
                    candle_core::Error::msg("a ControlNet's frozen base is missing")
                })?;
                let model = PixArtTransformer::new(
                    VarBuilder::from_tensors(frozen(base)?, dtype, device),
                    &self.cfg,
                )?;
                let vb = VarBuilder::from_tensors(own, dtype, device);
                Ok((model, Some(ControlNet::new(vb, &self.cfg, net.copies())?)))
            }
            None => {
                let vb = VarBuilder::from_tensors(own, dtype, device);
                Ok((PixArtTransformer::new(vb, &self.cfg)?, None))
            }
        }
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

/// The frozen base weights in f32 on `device`.
fn f32_on(weights: &HashMap<String, Tensor>, device: &Device) -> Result<HashMap<String, Tensor>> {
    weights
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(DType::F32)?.to_device(device)?)))
        .collect()
}

/// A variable map's variables, by name.
fn sorted_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("poisoned variable map"))?
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// The base weight a ControlNet parameter starts as: copy `i`'s block is the
/// base's block `i` (`controlnet_blocks.i.transformer_block.X` ←
/// `transformer_blocks.i.X`); `None` for the zero-started projections.
fn copied_from(name: &str) -> Option<String> {
    let rest = name.strip_prefix("controlnet_blocks.")?;
    let (i, field) = rest.split_once('.')?;
    let inner = field.strip_prefix("transformer_block.")?;
    Some(format!("transformer_blocks.{i}.{inner}"))
}

impl LoraState {
    /// The base weights with `alpha/rank · B·A` added to each adapted one;
    /// `ab` holds (A, B) per module, in order.
    fn merged(&self, ab: &[Tensor]) -> Result<HashMap<String, Tensor>> {
        let scale = self.spec.alpha / self.spec.rank as f64;
        let mut weights = self.base.clone();
        for (module, pair) in self.modules.iter().zip(ab.chunks(2)) {
            let name = format!("{module}.weight");
            let update = (pair[1].matmul(&pair[0])? * scale)?;
            let w = (&self.base[&name] + update)?;
            weights.insert(name, w);
        }
        Ok(weights)
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

    #[test]
    fn a_new_controlnet_copies_the_first_blocks_and_leaves_the_output_unchanged() {
        use pixart_models::pixart::Control;
        let cfg = tiny();
        let base = TrainModel::new(&cfg, Start::Scratch, 3, 0, &[], &Device::Cpu).unwrap();
        let weights: HashMap<String, Tensor> = base.tensors().into_iter().collect();
        let tm = TrainModel::new_controlnet(&cfg, &weights, 1, None, &Device::Cpu).unwrap();
        let value = |name: &str| {
            let p = tm.params.iter().find(|p| p.name == name).unwrap();
            p.var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let of = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            value("controlnet_blocks.0.transformer_block.attn2.to_v.weight"),
            of(&weights["transformer_blocks.0.attn2.to_v.weight"])
        );
        assert!(value("controlnet_blocks.0.before_proj.weight")
            .iter()
            .all(|v| *v == 0.0));
        assert!(value("controlnet_blocks.0.after_proj.bias")
            .iter()
            .all(|v| *v == 0.0));
        assert!(tm
            .params
            .iter()
            .all(|p| p.trainable && p.name.starts_with("controlnet_blocks.0.")));
        // Zero projections: the controlled forward is the base's, whatever the control.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
        let control = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
        let t = Tensor::new(&[10f32, 700.0], &dev).unwrap();
        let text = Tensor::randn(0f32, 1.0, (2, 3, 12), &dev).unwrap();
        let plain = tm.model.forward_train(&x, &t, &text, None, None).unwrap();
        let net = tm.controlnet.as_ref().unwrap();
        let controlled = tm
            .model
            .forward_train_controlled(
                &x,
                &t,
                &text,
                None,
                None,
                &Control {
                    net,
                    latents: &control,
                    scale: 1.0,
                },
            )
            .unwrap();
        assert_eq!(of(&plain), of(&controlled));
    }
}
