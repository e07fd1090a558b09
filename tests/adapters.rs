//! LoRA parity: the tiny transformer with LoRAs made by peft
//! (tests/fixtures/generate_adapters.py), loaded in each published layout and
//! merged by `lora.apply`, against peft's own forward.

mod common;

use pixart_models::lora::{self, Lora};
use pixart_nodes::pixart::{load, Denoiser};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use pixart_runtime::executor::{CachePolicy, Executor, RunOptions};
use pixart_runtime::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("reference/lora.safetensors");
    pixart_runtime::candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A fixture transformer folder, loaded in f32.
fn fixture_transformer(folder: &str) -> std::sync::Arc<Denoiser> {
    load::transformer(&fixtures().join(folder), DType::F32, &Device::Cpu).unwrap()
}

fn base() -> std::sync::Arc<Denoiser> {
    fixture_transformer("tiny-pixart/transformer")
}

fn forward(den: &Denoiser, r: &HashMap<String, Tensor>) -> Tensor {
    den.model
        .forward(&r["x"], &r["t"], &r["text"], Some(&r["mask"]), None)
        .unwrap()
}

/// The base transformer with `stack` merged in.
fn adapted(base: &Denoiser, stack: &[(&Lora, f64)]) -> Denoiser {
    let weights = lora::apply(&base.weights, stack).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    Denoiser {
        model: std::sync::Arc::new(
            pixart_models::pixart::PixArtTransformer::new(vb, base.model.config()).unwrap(),
        ),
        control: None,
        null_caption: None,
        weights,
        vae_scale_factor: 8,
    }
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let e = common::rel_err(got, want);
    assert!(e <= 1e-4, "{what}: relative error {e:e} > 1e-4");
}

#[test]
fn loras_in_every_layout_match_peft_at_each_strength_and_stacked() {
    let r = reference();
    let base = base();
    assert_close("base", &forward(&base, &r), &r["base"]);
    let dir = fixtures().join("tiny-lora");
    for (path, layout) in [
        (dir.join("peft"), "peft"),
        (dir.join("diffusers.safetensors"), "diffusers"),
        (dir.join("kohya.safetensors"), "kohya"),
    ] {
        let l = Lora::load(&path).unwrap();
        assert_eq!(l.layout, layout);
        assert_close(
            layout,
            &forward(&adapted(&base, &[(&l, 1.0)]), &r),
            &r["one"],
        );
        assert_close(
            &format!("{layout} at 0.5"),
            &forward(&adapted(&base, &[(&l, 0.5)]), &r),
            &r["half"],
        );
    }
    // peft's weights named on their own read their config beside them; away
    // from it they are refused rather than scaled by a guess.
    let file = dir.join("peft/adapter_model.safetensors");
    let alone = Lora::load(&file).unwrap();
    assert_close(
        "peft file",
        &forward(&adapted(&base, &[(&alone, 1.0)]), &r),
        &r["one"],
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(&file, tmp.path().join("adapter_model.safetensors")).unwrap();
    let err = Lora::load(&tmp.path().join("adapter_model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
    let first = Lora::load(&dir.join("stack-first")).unwrap();
    let rs = Lora::load(&dir.join("rslora")).unwrap();
    assert_close(
        "stacked (rank-stabilised second)",
        &forward(&adapted(&base, &[(&first, 1.0), (&rs, -0.7)]), &r),
        &r["stacked"],
    );
    // Strength 0 is the base model; the weights a LoRA does not touch are shared.
    let none = adapted(&base, &[(&first, 0.0)]);
    assert_close("strength 0", &forward(&none, &r), &r["base"]);
    let shared = &base.weights["caption_projection.linear_1.weight"];
    assert_eq!(
        none.weights["caption_projection.linear_1.weight"].id(),
        shared.id()
    );
}

#[test]
fn a_lora_that_does_not_fit_is_refused_with_its_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: Vec<(&str, Tensor)>| {
        let path = tmp.path().join(name);
        let map: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| (k.to_string(), t))
            .collect();
        pixart_runtime::candle_core::safetensors::save(&map, &path).unwrap();
        path
    };
    let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    // A module the transformer lacks (block 9 of 2).
    let path = write(
        "far.safetensors",
        vec![
            (
                "transformer.transformer_blocks.9.attn1.to_q.lora_A.weight",
                t(&[2, 24]),
            ),
            (
                "transformer.transformer_blocks.9.attn1.to_q.lora_B.weight",
                t(&[24, 2]),
            ),
        ],
    );
    let far = Lora::load(&path).unwrap();
    let err = lora::apply(&base().weights, &[(&far, 1.0)]).unwrap_err();
    assert!(err.contains("transformer_blocks.9.attn1.to_q"), "{err}");
    // Keys of something else, and a module missing its up weight.
    let path = write(
        "odd.safetensors",
        vec![
            ("model.diffusion_model.input_blocks.0.weight", t(&[2])),
            ("transformer.proj_out.lora_A.weight", t(&[2, 24])),
        ],
    );
    let err = Lora::load(&path).unwrap_err().to_string();
    assert!(err.contains("input_blocks.0.weight"), "{err}");
    let path = write(
        "half.safetensors",
        vec![("transformer.proj_out.lora_A.weight", t(&[2, 24]))],
    );
    let err = Lora::load(&path).unwrap_err().to_string();
    assert!(err.contains("proj_out") && err.contains("up"), "{err}");
    // Shapes that do not fit the weight.
    let path = write(
        "wide.safetensors",
        vec![
            ("transformer.proj_out.lora_A.weight", t(&[2, 30])),
            ("transformer.proj_out.lora_B.weight", t(&[32, 2])),
        ],
    );
    let wide = Lora::load(&path).unwrap();
    let err = lora::apply(&base().weights, &[(&wide, 1.0)]).unwrap_err();
    assert!(err.contains("proj_out"), "{err}");
}

/// Runs `yaml` (paths under tests/fixtures) up to its node `apply`.
async fn run_to_apply(yaml: &str) -> pixart_runtime::RunReport {
    let (reg, _) = common::registry();
    let wf = common::load(yaml, &reg);
    let out = tempfile::tempdir().unwrap();
    Executor::new(CachePolicy::None)
        .run(
            &wf,
            RunOptions {
                targets: vec!["apply".into()],
                out_dir: out.path().into(),
                base_dir: fixtures(),
                ..RunOptions::default()
            },
        )
        .await
        .unwrap()
}

/// The transformer node `apply` produced.
fn applied(report: &pixart_runtime::RunReport) -> &Denoiser {
    let Some(Value::Handle(h)) = report.output("apply", "transformer") else {
        panic!("no transformer: {:?}", report.failures);
    };
    h.downcast::<Denoiser>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_load_and_stack_loras() {
    let yaml = r#"version: 1
nodes:
  t: {type: transformer.load, inputs: {path: tiny-pixart/transformer}}
  a: {type: lora.load, inputs: {path: tiny-lora/stack-first}}
  b: {type: lora.load, inputs: {path: tiny-lora/rslora}}
  apply: {type: lora.apply, inputs: {transformer: "${t.transformer}", lora: "${a.lora}", lora_2: "${b.lora}", strength_2: -0.7}}
"#;
    let report = run_to_apply(yaml).await;
    let den = applied(&report);
    let r = reference();
    assert_close("lora.apply", &forward(den, &r), &r["stacked"]);
}

fn control_reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("reference/controlnet.safetensors");
    pixart_runtime::candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The transformer the fixture ControlNet adapts.
fn control_base() -> std::sync::Arc<Denoiser> {
    fixture_transformer("tiny-controlnet/transformer")
}

/// The ControlNet in both layouts against the official forward written out
/// (tests/fixtures/generate_adapters.py `controlled_forward`), at scale 1 and 0.5.
#[test]
fn controlnets_in_both_layouts_match_the_official_forward() {
    use pixart_models::pixart::{read_controlnet, Control, ControlNet};
    let r = control_reference();
    let base = control_base();
    let plain = base
        .model
        .forward(&r["x"], &r["t"], &r["text"], Some(&r["mask"]), None)
        .unwrap();
    assert_close("without control", &plain, &r["plain"]);
    for path in [
        fixtures().join("tiny-controlnet/controlnet"),
        fixtures().join("tiny-controlnet-official.pth"),
    ] {
        let (tensors, copies) = read_controlnet(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(copies, 2, "{}", path.display());
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let net = ControlNet::new(vb, base.model.config(), copies).unwrap();
        for (scale, want) in [(1.0, "controlled"), (0.5, "half")] {
            let control = Control {
                net: &net,
                latents: &r["control"],
                scale,
            };
            let got = base
                .model
                .forward_controlled(
                    &r["x"],
                    &r["t"],
                    &r["text"],
                    Some(&r["mask"]),
                    None,
                    &control,
                )
                .unwrap();
            assert_close(&format!("{} at {scale}", path.display()), &got, &r[want]);
        }
    }
    // A control latent of another size is refused by name.
    let net = {
        let (tensors, copies) = read_controlnet(
            &fixtures().join("tiny-controlnet/controlnet"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        ControlNet::new(vb, base.model.config(), copies).unwrap()
    };
    let small = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let err = base
        .model
        .forward_controlled(
            &r["x"],
            &r["t"],
            &r["text"],
            Some(&r["mask"]),
            None,
            &Control {
                net: &net,
                latents: &small,
                scale: 1.0,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("control latent"), "{err}");
}

/// ControlNet training's forward and backward against the official forward's in
/// PyTorch: the same output, and the same gradients for the ControlNet's
/// parameters (the base frozen) of a fixed weighting of it.
#[test]
fn controlnet_training_matches_the_official_gradients() {
    use pixart_models::pixart::{read_controlnet, Control, ControlNet};
    use pixart_runtime::candle_core::Var;
    let r = control_reference();
    let base = control_base();
    let (tensors, copies) = read_controlnet(
        &fixtures().join("tiny-controlnet/controlnet"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let vars: HashMap<String, Var> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(
        vars.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect(),
        DType::F32,
        &Device::Cpu,
    );
    let net = ControlNet::new(vb, base.model.config(), copies).unwrap();
    let out = base
        .model
        .forward_train_controlled(
            &r["x"],
            &r["t"],
            &r["text"],
            Some(&r["mask"]),
            None,
            &Control {
                net: &net,
                latents: &r["control"],
                scale: 1.0,
            },
        )
        .unwrap();
    assert_close("the training forward", &out, &r["controlled"]);
    let grads = (out * &r["loss_weights"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut checked = 0;
    for (key, want) in &r {
        let Some(name) = key.strip_prefix("grad.") else {
            continue;
        };
        let got = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(name, got, want);
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controlnet_nodes_lead_the_transformer() {
    let yaml = r#"version: 1
nodes:
  t: {type: transformer.load, inputs: {path: tiny-controlnet/transformer}}
  c: {type: controlnet.load, inputs: {path: tiny-controlnet-official.pth}}
  latent: {type: tensor.load, inputs: {path: reference/controlnet.safetensors, key: control}}
  apply: {type: controlnet.apply, inputs: {transformer: "${t.transformer}", controlnet: "${c.controlnet}", control: "${latent.tensor}"}}
"#;
    let report = run_to_apply(yaml).await;
    let den = applied(&report);
    let r = control_reference();
    // One ControlNet at a time: a second on top is refused, not dropped.
    let twice = format!(
        "{yaml}  again: {{type: controlnet.apply, inputs: {{transformer: \"${{apply.transformer}}\", controlnet: \"${{c.controlnet}}\", control: \"${{latent.tensor}}\"}}}}\n"
    );
    let refused = run_to_apply(
        &twice
            .replace("  apply:", "  first:")
            .replace("${apply.", "${first.")
            .replace("  again:", "  apply:"),
    )
    .await;
    assert!(
        format!("{:?}", refused.failures).contains("already has a ControlNet"),
        "{:?}",
        refused.failures
    );
    let got = den
        .forward(&r["x"], &r["t"], &r["text"], Some(&r["mask"]), None)
        .unwrap();
    assert_close("controlnet.apply", &got, &r["controlled"]);
}

/// `image.canny` equals OpenCV's `cv2.Canny` on the fixture picture, pixel for
/// pixel, at two threshold pairs.
#[test]
fn canny_edges_equal_opencv() {
    let path = fixtures().join("reference/canny.safetensors");
    let r = pixart_runtime::candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let image = &r["image"];
    let (_, h, w, c) = image.dims4().unwrap();
    let bytes: Vec<u8> = image
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    for (name, low, high) in [
        ("edges_100_200", 100.0, 200.0),
        ("edges_50_120", 50.0, 120.0),
    ] {
        let want = r[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got = pixart_nodes::edges::canny(&bytes, h, w, c, low, high);
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} pixels differ",
            want.len()
        );
    }
    // The thresholds swap when given the wrong way round, as OpenCV's do.
    let swapped = pixart_nodes::edges::canny(&bytes, h, w, c, 200.0, 100.0);
    let want = r["edges_100_200"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(swapped, want);
}

/// pixart.sample under a ControlNet, with CFG (a batch of 2 sharing the one
/// control latent): it samples, and the control changes what it makes. (The
/// tiny transformer's sample size 32 puts it on the 256 px bins: latents 32×32.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixart_sample_runs_under_a_controlnet_with_guidance() {
    let sample = |transformer: &str| {
        format!(
            r#"version: 1
nodes:
  pipe: {{type: pixart.load, inputs: {{path: tiny-pixart}}}}
  t: {{type: transformer.load, inputs: {{path: tiny-controlnet/transformer}}}}
  c: {{type: controlnet.load, inputs: {{path: tiny-controlnet/controlnet}}}}
  latent: {{type: noise.gaussian, inputs: {{shape: [1, 4, 32, 32], seed: 9}}}}
  ctl: {{type: controlnet.apply, inputs: {{transformer: "${{t.transformer}}", controlnet: "${{c.controlnet}}", control: "${{latent.tensor}}"}}}}
  pos: {{type: t5.encode, inputs: {{tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", text: a red circle}}}}
  neg: {{type: t5.encode, inputs: {{tokenizer: "${{pipe.tokenizer}}", encoder: "${{pipe.text_encoder}}", text: ""}}}}
  apply: {{type: pixart.sample, inputs: {{transformer: "${{{transformer}}}", scheduler: "${{pipe.scheduler}}", positive: "${{pos.conditioning}}", negative: "${{neg.conditioning}}", steps: 3, guidance: 4.5, width: 256, height: 256, seed: 5}}}}
"#
        )
    };
    let latents = |report: &pixart_runtime::RunReport| match report.output("apply", "latents") {
        Some(Value::Latents(l)) => l.tensor.clone(),
        other => panic!("no latents: {other:?}; {:?}", report.failures),
    };
    let controlled = latents(&run_to_apply(&sample("ctl.transformer")).await);
    let plain = latents(&run_to_apply(&sample("t.transformer")).await);
    assert_eq!(controlled.dims(), &[1, 4, 32, 32]);
    let differ = common::max_abs_diff(&controlled, &plain);
    assert!(differ > 1e-3, "the control changed nothing ({differ})");
}
