//! Reference parity: every model component against the Python reference
//! (diffusers 0.42.1 / transformers 5.24) on the tiny random-weight fixtures that
//! `tests/fixtures/generate.py` builds. Tolerances are relative to each reference
//! tensor's largest magnitude.

mod common;

use pixart_models::pixart::SizeConditions;
use pixart_models::schedulers::SchedulerConfig;
use pixart_models::tokenizer::T5Tokenizer;
use pixart_nodes::device::TextWeights;
use pixart_nodes::pixart::binning::resize_and_crop;
use pixart_nodes::pixart::load;
use pixart_nodes::pixart::sample::{sample, Init, Request};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use pixart_runtime::Conditioning;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `PIXART_FIXTURES_DIR` overrides where the fixtures are (for a prebuilt test
/// binary run on another machine, as scripts/gpu-check.sh does).
fn fixtures() -> PathBuf {
    match std::env::var_os("PIXART_FIXTURES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// `PIXART_TEST_DEVICE=cuda` runs the parity tests on the GPU (a `--features cuda`
/// build; see scripts/gpu-check.sh). Default: the CPU.
fn dev() -> Device {
    match std::env::var("PIXART_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            Device::new_cuda(0).expect("PIXART_TEST_DEVICE=cuda needs a CUDA build and GPU")
        }
        _ => Device::Cpu,
    }
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference").join(name);
    pixart_runtime::candle_core::safetensors::load(&path, &dev()).unwrap()
}

fn get<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    r.get(key)
        .unwrap_or_else(|| panic!("reference has no {key}"))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = common::rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn tokenizer_ids_are_exact_from_tokenizer_json_and_from_spiece_model() {
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let dir = fixtures().join("tiny-pixart/tokenizer");
    let fast = T5Tokenizer::from_folder(&dir).unwrap();
    // The same folder without tokenizer.json: built from spiece.model.
    let only_spm = tempfile::tempdir().unwrap();
    for f in [
        "spiece.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(dir.join(f), only_spm.path().join(f)).unwrap();
    }
    let slow = T5Tokenizer::from_folder(only_spm.path()).unwrap();
    assert_eq!(fast.vocab_size(), slow.vocab_size());
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want_mask: Vec<u32> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
        for (which, tok) in [("tokenizer.json", &fast), ("spiece.model", &slow)] {
            let got = tok.encode(text, 120).unwrap();
            assert_eq!(got.ids, want_ids, "{which}: {text:?}");
            assert_eq!(got.mask, want_mask, "{which}: {text:?}");
        }
    }
}

/// The tiny fixture's T5 loaded as asked, run on the reference's input; and the
/// reference.
fn tiny_t5(dtype: DType, weights: TextWeights) -> (Tensor, HashMap<String, Tensor>) {
    let r = reference("t5.safetensors");
    let enc = load::text_encoder(
        &fixtures().join("tiny-pixart/text_encoder"),
        dtype,
        weights,
        &dev(),
    )
    .unwrap();
    let out = enc
        .forward(&ids_u32(get(&r, "input_ids")), get(&r, "attention_mask"))
        .unwrap();
    (out, r)
}

#[test]
fn t5_encoder_with_mask_matches_transformers() {
    let (out, r) = tiny_t5(DType::F32, TextWeights::Auto);
    assert_close(
        "T5 last_hidden_state",
        &out,
        get(&r, "last_hidden_state"),
        1e-4,
    );
}

/// The transformer's output on a recorded case against the reference's `{case}.out`.
fn check_transformer_case(
    den: &pixart_nodes::pixart::Denoiser,
    r: &HashMap<String, Tensor>,
    case: &str,
    label: &str,
) {
    assert_close(
        label,
        &run_transformer(den, r, case),
        get(r, &format!("{case}.out")),
        1e-4,
    );
}

fn run_transformer(
    den: &pixart_nodes::pixart::Denoiser,
    r: &HashMap<String, Tensor>,
    case: &str,
) -> Tensor {
    let k = |n: &str| get(r, &format!("{case}.{n}")).clone();
    let (res, ar) = (
        r.get(&format!("{case}.resolution")),
        r.get(&format!("{case}.aspect_ratio")),
    );
    let sizes = match (res, ar) {
        (Some(resolution), Some(aspect_ratio)) => Some(SizeConditions {
            resolution,
            aspect_ratio,
        }),
        _ => None,
    };
    den.model
        .forward(
            &k("x"),
            &k("t"),
            &k("text"),
            Some(&k("mask")),
            sizes.as_ref(),
        )
        .unwrap()
}

#[test]
fn transformer_forward_matches_diffusers_square_wide_and_multiscale() {
    let r = reference("transformer.safetensors");
    let den = load::transformer(
        &fixtures().join("tiny-pixart/transformer"),
        DType::F32,
        &dev(),
    )
    .unwrap();
    for case in ["square", "wide"] {
        check_transformer_case(&den, &r, case, case);
    }
    let ms = load::transformer(
        &fixtures().join("tiny-pixart-ms/transformer"),
        DType::F32,
        &dev(),
    )
    .unwrap();
    assert!(ms.model.config().additional_conditions());
    assert_close(
        "ms",
        &run_transformer(&ms, &r, "ms"),
        get(&r, "ms.out"),
        1e-4,
    );
}

#[test]
fn official_pth_checkpoints_equal_the_diffusers_ones() {
    let r = reference("transformer.safetensors");
    let nulls = reference("y_embedding.safetensors");
    for (pth, config_dir, case, null_key) in [
        (
            "tiny-pixart-official.pth",
            "tiny-pixart/transformer",
            "square",
            "y_embedding",
        ),
        (
            "tiny-pixart-ms-official.pth",
            "tiny-pixart-ms/transformer",
            "ms",
            "ms.y_embedding",
        ),
    ] {
        // A tiny model's head count cannot be read off its shapes: its config.json
        // sits next to the checkpoint, as a user would place it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixtures().join(pth), dir.path().join(pth)).unwrap();
        std::fs::copy(
            fixtures().join(config_dir).join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let den = load::transformer(&dir.path().join(pth), DType::F32, &dev()).unwrap();
        check_transformer_case(&den, &r, case, pth);
        let null = den.null_caption.as_ref().expect("the learned null caption");
        assert_close("y_embedding", null, get(&nulls, null_key), 0.0);
    }
    // Without a config, a hidden size that is not a multiple of 72 is a clear error.
    let lonely = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-pixart-official.pth"),
        lonely.path().join("m.pth"),
    )
    .unwrap();
    let err = load::transformer(&lonely.path().join("m.pth"), DType::F32, &dev())
        .err()
        .unwrap();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let r = reference("vae.safetensors");
    let vae = load::vae(&fixtures().join("tiny-pixart/vae"), DType::F32, &dev()).unwrap();
    let post = vae.encode(get(&r, "encode.image")).unwrap();
    assert_close("posterior mean", &post.mean, get(&r, "encode.mean"), 1e-4);
    assert_close(
        "posterior logvar",
        &post.logvar,
        get(&r, "encode.logvar"),
        1e-4,
    );
    let image = vae.decode(get(&r, "decode.latents")).unwrap();
    assert_close("decode", &image, get(&r, "decode.image"), 1e-4);
}

fn scheduler_config() -> SchedulerConfig {
    load::scheduler(&fixtures().join("tiny-pixart/scheduler"))
        .unwrap()
        .config
}

fn check_sampler(file: &str, sampler: &str, steps: usize) {
    check_sampler_run(&reference(file), "", &scheduler_config(), sampler, steps);
}

/// One recorded run (keys `{prefix}timesteps`, `x0`, `model_outputs`, `samples`,
/// optionally `noises`), step by step.
fn check_sampler_run(
    r: &HashMap<String, Tensor>,
    prefix: &str,
    config: &SchedulerConfig,
    sampler: &str,
    steps: usize,
) {
    let key = |k: &str| format!("{prefix}{k}");
    let mut s = config.start(sampler, steps).unwrap();
    let want_t: Vec<i64> = get(r, &key("timesteps")).to_vec1().unwrap();
    let got_t: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
    assert_eq!(got_t, want_t, "{sampler} timesteps");
    let outputs = get(r, &key("model_outputs"));
    let samples = get(r, &key("samples"));
    let noises = r.get(&key("noises"));
    let mut x = get(r, &key("x0")).clone();
    for i in 0..steps {
        let noise = noises.map(|n| n.get(i).unwrap());
        let noise = if s.needs_noise() { noise } else { None };
        x = s
            .step(&outputs.get(i).unwrap(), &x, noise.as_ref())
            .unwrap();
        // Compare with the reference and continue from it, so each step is checked alone.
        let want = samples.get(i).unwrap();
        assert_close(&format!("{sampler} {prefix}step {i}"), &x, &want, 1e-4);
        x = want;
    }
}

#[test]
fn dpm_solver_pp_steps_match_diffusers() {
    check_sampler("dpmsolver.safetensors", "dpm_solver++", 20);
}

#[test]
fn ddim_steps_match_diffusers() {
    check_sampler("ddim.safetensors", "ddim", 20);
}

#[test]
fn iddpm_steps_match_the_official_sampler() {
    check_sampler("iddpm.safetensors", "iddpm", 100);
}

/// PixArt-LCM's sampler: 4 of the 50 distilled timesteps, noise between steps.
#[test]
fn lcm_steps_match_diffusers() {
    check_sampler("lcm.safetensors", "lcm", 4);
}

/// SA-Solver as PixArt-α's README sets it up (the pipeline's config with
/// algorithm_type data_prediction), with higher orders, and on noise prediction.
#[test]
fn sa_solver_steps_match_diffusers() {
    let r = reference("sa_solver.safetensors");
    for (variant, algorithm, predictor, corrector) in [
        ("default", "dpmsolver++", 2, 2),
        ("orders", "data_prediction", 3, 4),
        ("noise_prediction", "noise_prediction", 2, 2),
    ] {
        let mut config = scheduler_config();
        config.algorithm_type = algorithm.into();
        config.predictor_order = predictor;
        config.corrector_order = corrector;
        check_sampler_run(&r, &format!("{variant}."), &config, "sa_solver", 20);
    }
    let sasolver: SchedulerConfig =
        serde_json::from_value(serde_json::json!({"_class_name": "SASolverScheduler"})).unwrap();
    assert_eq!(sasolver.default_sampler(), "sa_solver");
}

fn conditioning(emb: &Tensor, mask: &Tensor) -> Conditioning {
    Conditioning {
        embeddings: emb.clone(),
        mask: mask.to_dtype(DType::F32).unwrap(),
        empty_prompt: false,
    }
}

#[test]
fn whole_pipeline_matches_diffusers() {
    let cases = [
        ("square", 256, 256),
        ("binned", 200, 304),
        ("resized", 112, 152),
    ];
    pipeline_matches("tiny-pixart", "pipeline.safetensors", 120, &cases);
}

/// PixArt-Σ: 300-token prompts chosen by the pipeline folder, a transformer
/// without micro-conditions and with interpolation_scale 0.5, SDXL's VAE scale.
#[test]
fn sigma_pipeline_matches_diffusers() {
    let cases = [("square", 256, 256), ("binned", 200, 304)];
    pipeline_matches(
        "tiny-pixart-sigma",
        "sigma_pipeline.safetensors",
        300,
        &cases,
    );
}

/// What a pipeline folder samples with: its transformer and scheduler, and the
/// fixtures' prompt and the empty negative encoded at `tokens` tokens.
fn sampling_parts(
    root: &Path,
    tokens: usize,
) -> (
    std::sync::Arc<pixart_nodes::pixart::Denoiser>,
    load::SchedulerChoice,
    Conditioning,
    Conditioning,
) {
    let dev = dev();
    let tok = load::tokenizer(&root.join("tokenizer")).unwrap();
    let enc = load::text_encoder(
        &root.join("text_encoder"),
        DType::F32,
        TextWeights::Auto,
        &dev,
    )
    .unwrap();
    let den = load::transformer(&root.join("transformer"), DType::F32, &dev).unwrap();
    let choice = load::scheduler(&root.join("scheduler")).unwrap();
    let encode = |text: &str| {
        let e = tok.encode(text, tokens).unwrap();
        let ids = Tensor::from_vec(e.ids, (1, tokens), &dev).unwrap();
        let mask = Tensor::from_vec(e.mask, (1, tokens), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        conditioning(&enc.forward(&ids, &mask).unwrap(), &mask)
    };
    let pos = encode("a small cactus with a happy face in the sahara desert");
    let neg = encode("");
    (den, choice, pos, neg)
}

/// A diffusers pipeline folder run as its pipeline class does (20 steps, CFG
/// 4.5, resolution binning), prompt tokens at the tokenizer's own length.
fn pipeline_matches(
    folder: &str,
    reference_file: &str,
    tokens: usize,
    cases: &[(&str, usize, usize)],
) {
    let r = reference(reference_file);
    let root = fixtures().join(folder);
    let tok = load::tokenizer(&root.join("tokenizer")).unwrap();
    assert_eq!(
        tok.sequence_length(),
        tokens,
        "the pipeline's prompt length"
    );
    let (den, choice, pos, neg) = sampling_parts(&root, tokens);
    let vae = load::vae(&root.join("vae"), DType::F32, &dev()).unwrap();
    assert_close(
        "prompt embeds",
        &pos.embeddings,
        get(&r, "square.prompt_embeds"),
        1e-4,
    );
    assert_close(
        "negative embeds",
        &neg.embeddings,
        get(&r, "square.negative_embeds"),
        1e-4,
    );

    for &(case, height, width) in cases {
        let req = Request {
            positive: &pos,
            negative: Some(&neg),
            guidance: 4.5,
            width,
            height,
            seed: 0,
            latents: Some(get(&r, &format!("{case}.latents")).clone()),
            resolution_binning: true,
            vae_scale: 8,
            init: None,
        };
        let mut sampler = choice.config.start(&choice.sampler, 20).unwrap();
        let latents = sample(&den, sampler.as_mut(), &req, |_| Ok(())).unwrap();
        assert_close(
            &format!("{folder} {case} final latents"),
            &latents,
            get(&r, &format!("{case}.final_latents")),
            1e-3,
        );
        let decoded = vae
            .decode(&(latents / vae.config().scaling_factor).unwrap())
            .unwrap();
        let decoded = resize_and_crop(&decoded, height, width).unwrap();
        let image = ((decoded / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        assert_close(
            &format!("{folder} {case} image"),
            &image,
            get(&r, &format!("{case}.image")),
            1e-3,
        );
    }
}

/// img2img and inpainting on tiny-pixart against diffusers' generic algorithms
/// (written out in tests/fixtures/generate_family.py: diffusers has no PixArt
/// pipeline for them), which for inpainting is also the official PixArt-α
/// pipeline's arithmetic, its pure-noise start at full strength included.
#[test]
fn img2img_and_inpainting_match_diffusers_algorithms() {
    let r = reference("img2img.safetensors");
    let (den, choice, pos, neg) = sampling_parts(&fixtures().join("tiny-pixart"), 120);
    let mask = get(&r, "mask_image")
        .narrow(3, 0, 1)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap();
    let cases = [
        ("img2img", 0.6, false),
        ("inpaint", 0.85, true),
        ("inpaint_full", 1.0, true),
    ];
    for (case, strength, masked) in cases {
        let req = Request {
            positive: &pos,
            negative: Some(&neg),
            guidance: 4.5,
            width: 256,
            height: 256,
            seed: 0,
            latents: Some(get(&r, "noise").clone()),
            resolution_binning: false,
            vae_scale: 8,
            init: Some(Init {
                latents: get(&r, "init_latents").clone(),
                strength,
                mask: masked.then(|| mask.clone()),
            }),
        };
        let mut sampler = choice.config.start(&choice.sampler, 20).unwrap();
        let mut first = None;
        let latents = sample(&den, sampler.as_mut(), &req, |step| {
            if first.is_none() {
                first = Some((step.index, step.total, step.sample.clone()));
            }
            Ok(())
        })
        .unwrap();
        let (index, total, start) = first.unwrap();
        assert_eq!((index, total), (1, (20.0 * strength) as usize), "{case}");
        assert_close(
            &format!("{case} start latents"),
            &start,
            get(&r, &format!("{case}.start_latents")),
            1e-5,
        );
        assert_close(
            &format!("{case} final latents"),
            &latents,
            get(&r, &format!("{case}.final_latents")),
            1e-3,
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn hub_layout_variants_load_unchanged() {
    // The hub's PixArt configs name the class `Transformer2DModel`.
    let dir = tempfile::tempdir().unwrap();
    let tdir = dir.path().join("transformer");
    copy_dir(&fixtures().join("tiny-pixart/transformer"), &tdir);
    let cfg = std::fs::read_to_string(tdir.join("config.json")).unwrap();
    let legacy = cfg.replace("\"PixArtTransformer2DModel\"", "\"Transformer2DModel\"");
    assert_ne!(cfg, legacy);
    std::fs::write(tdir.join("config.json"), legacy).unwrap();
    let r = reference("transformer.safetensors");
    let den = load::transformer(&tdir, DType::F32, &dev()).unwrap();
    assert_close(
        "legacy class name",
        &run_transformer(&den, &r, "square"),
        get(&r, "square.out"),
        1e-4,
    );

    // Older T5 checkpoints store `encoder.embed_tokens.weight` instead of the tied `shared.weight`.
    let edir = dir.path().join("text_encoder");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for e in std::fs::read_dir(fixtures().join("tiny-pixart/text_encoder")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            tensors
                .extend(pixart_runtime::candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    let shared = tensors
        .remove("shared.weight")
        .expect("the fixture stores shared.weight");
    tensors.insert("encoder.embed_tokens.weight".into(), shared);
    std::fs::create_dir_all(&edir).unwrap();
    pixart_runtime::candle_core::safetensors::save(&tensors, edir.join("model.safetensors"))
        .unwrap();
    std::fs::copy(
        fixtures().join("tiny-pixart/text_encoder/config.json"),
        edir.join("config.json"),
    )
    .unwrap();
    let r = reference("t5.safetensors");
    let enc = load::text_encoder(&edir, DType::F32, TextWeights::Auto, &dev()).unwrap();
    let out = enc
        .forward(&ids_u32(get(&r, "input_ids")), get(&r, "attention_mask"))
        .unwrap();
    assert_close(
        "T5 with embed_tokens",
        &out,
        get(&r, "last_hidden_state"),
        1e-4,
    );
}

#[test]
fn half_precision_stays_close_to_f32() {
    let r = reference("transformer.safetensors");
    let path = fixtures().join("tiny-pixart/transformer");
    let mut dtypes = vec![(DType::F16, 1e-2)];
    if dev().is_cpu() {
        let err = load::transformer(&path, DType::BF16, &dev())
            .err()
            .expect("bf16 on the CPU is refused");
        assert!(err.to_string().contains("bf16 needs a GPU"), "{err}");
    } else {
        dtypes.push((DType::BF16, 5e-2));
    }
    for (dtype, tol) in dtypes {
        let den =
            load::transformer(&fixtures().join("tiny-pixart/transformer"), dtype, &dev()).unwrap();
        let out = run_transformer(&den, &r, "square");
        assert_eq!(out.dtype(), dtype);
        assert_close(
            &format!("{dtype:?} transformer"),
            &out,
            get(&r, "square.out"),
            tol,
        );
    }
}

#[test]
fn t5_in_half_precision_matches_transformers_half_precision() {
    // transformers keeps `wo` in f32 (its residual stream turns f32); an f16
    // residual would drift from it (and overflow on T5-XXL).
    let (out, r) = tiny_t5(DType::F16, TextWeights::Auto);
    assert_eq!(out.dtype(), DType::F16);
    let vs_f16 = common::rel_err(&out, get(&r, "f16_last_hidden_state"));
    let vs_f32 = common::rel_err(&out, get(&r, "last_hidden_state"));
    eprintln!("T5 f16: {vs_f16:e} from transformers' f16, {vs_f32:e} from f32");
    // Two f16 computations agree to a few f16 ulps (2^-10 relative) of the largest
    // value; and ours follows transformers' f16 path more than the f32 one.
    assert!(vs_f16 <= 4.0 * 2f32.powi(-10), "{vs_f16:e}");
    assert!(vs_f16 < vs_f32, "{vs_f16:e} vs {vs_f32:e}");
}

#[test]
fn t5_with_bf16_weights_stays_within_bf16_rounding_of_f32() {
    // f32 arithmetic on weights rounded to bf16 (`text_encoder_weights: bf16`):
    // the only error is the weights' rounding, 2^-8 of each.
    let (out, r) = tiny_t5(DType::F32, TextWeights::Bf16);
    assert_eq!(out.dtype(), DType::F32);
    let e = common::rel_err(&out, get(&r, "last_hidden_state"));
    eprintln!("T5 with bf16 weights: {e:e} from transformers' f32");
    // A few bf16 steps of the largest value; and not f32's agreement, which would
    // mean the weights were not rounded at all.
    assert!(e <= 4.0 * 2f32.powi(-8), "{e:e}");
    assert!(e > 1e-5, "{e:e}");
}

#[test]
fn t5_with_int8_weights_stays_within_int8_rounding_of_f32() {
    // f32 arithmetic on 8-bit weights (`text_encoder_weights: int8`): each weight
    // within half a step, 1/254 of its block's largest |w|; the tiny T5's random
    // weights make that ~1/100 of a typical weight.
    let (out, r) = tiny_t5(DType::F32, TextWeights::Int8);
    assert_eq!(out.dtype(), DType::F32);
    let e = common::rel_err(&out, get(&r, "last_hidden_state"));
    eprintln!("T5 with int8 weights: {e:e} from transformers' f32");
    // A few int8 steps of the largest value; and not bf16's (or f32's) agreement,
    // which would mean the weights were not quantized.
    assert!(e <= 4.0 / 127.0, "{e:e}");
    assert!(e > 1e-4, "{e:e}");
}

#[test]
fn training_loss_matches_the_official_objective() {
    use pixart_nodes::training::loss::Diffusion;
    let r = reference("training_loss.safetensors");
    let t: Vec<usize> = get(&r, "t")
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as usize)
        .collect();
    let d = Diffusion::linear(1e-4, 0.02, 1000);
    let (x0, noise) = (get(&r, "x_start"), get(&r, "noise"));
    assert_close(
        "x_t",
        &d.q_sample(x0, &t, noise).unwrap(),
        get(&r, "x_t"),
        1e-5,
    );

    let out = pixart_runtime::candle_core::Var::from_tensor(get(&r, "model_output")).unwrap();
    let terms = d.loss(x0, &t, noise, out.as_tensor()).unwrap();
    assert_close("mse", &terms.mse, get(&r, "mse"), 1e-5);
    assert_close("vb", &terms.vb, get(&r, "vb"), 1e-4);
    assert_close("loss", &terms.loss, get(&r, "loss"), 1e-4);
    let (_, kl, nll) = d.terms(x0, &t, noise, out.as_tensor()).unwrap();
    assert_close("kl", &kl, get(&r, "kl"), 1e-4);
    // The decoder term is only used at t = 0; for large t its f32 value is
    // ill-conditioned (the CDF difference cancels) in the reference too.
    assert_eq!(t[0], 0);
    assert_close(
        "decoder nll at t = 0",
        &nll.narrow(0, 0, 1).unwrap(),
        &get(&r, "decoder_nll").narrow(0, 0, 1).unwrap(),
        1e-4,
    );

    // Gradients: ε only from the MSE, v only from the bound (the mean is frozen there).
    let grads = terms.loss.mean_all().unwrap().backward().unwrap();
    let grad = grads
        .get(out.as_tensor())
        .expect("a gradient for the model output");
    assert_close(
        "d loss / d model_output",
        grad,
        get(&r, "grad_model_output"),
        1e-4,
    );
}

#[test]
fn training_forward_equals_inference_and_every_parameter_gets_a_gradient() {
    // As the CLI runs training: subnormals flushed (pixart_runtime::float_env).
    pixart_runtime::float_env::flush_to_zero();
    use pixart_models::pixart::PixArtTransformer;
    use pixart_nodes::training::loss::Diffusion;
    use pixart_runtime::candle_core::Var;
    let (cfg, weights) = tiny_transformer();
    let varmap = candle_nn::VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in &weights {
            data.insert(name.clone(), Var::from_tensor(t).unwrap());
        }
    }
    let model = PixArtTransformer::new(
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev()),
        &cfg,
    )
    .unwrap();
    let r = reference("transformer.safetensors");
    let k = |n: &str| get(&r, &format!("square.{n}")).clone();
    let out = model
        .forward_train(&k("x"), &k("t"), &k("text"), Some(&k("mask")), None)
        .unwrap();
    assert_close("training forward", &out, get(&r, "square.out"), 1e-4);

    let d = Diffusion::linear(1e-4, 0.02, 1000);
    let x0 = k("x");
    let noise = (k("x") * 0.5).unwrap().sin().unwrap();
    let loss_of = |model: &PixArtTransformer| {
        let out = model
            .forward_train(&k("x"), &k("t"), &k("text"), Some(&k("mask")), None)
            .unwrap();
        d.loss(&x0, &[999, 500], &noise, &out)
            .unwrap()
            .loss
            .mean_all()
            .unwrap()
    };
    let loss = loss_of(&model);
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm² {norm}"
        );
    }
    // Finite differences agree with autograd on a few weights.
    for (name, index) in [
        ("transformer_blocks.0.attn2.to_q.weight", 5usize),
        ("adaln_single.linear.bias", 3),
        ("caption_projection.linear_1.weight", 7),
        ("proj_out.bias", 2),
    ] {
        let var = &vars[name];
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[index] as f64;
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut v = original.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &dev()).unwrap())
                .unwrap();
            loss_of(&model).to_scalar::<f32>().unwrap() as f64
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
        at(0.0);
        let err = (numeric - analytic).abs() / analytic.abs().max(1e-4);
        assert!(
            err < 2e-2,
            "{name}[{index}]: numeric {numeric:e} vs autograd {analytic:e}"
        );
    }
}

#[test]
fn optimiser_step_matches_pytorch() {
    // As the CLI runs training: subnormals flushed (pixart_runtime::float_env).
    pixart_runtime::float_env::flush_to_zero();
    use pixart_nodes::training::optim::{clip_grad_norm, warmup_lr, AdamW, Ema};
    use pixart_runtime::candle_core::backprop::GradStore;
    use pixart_runtime::candle_core::Var;
    let r = reference("optimizer.safetensors");
    let vars = [
        Var::from_tensor(get(&r, "p0_init")).unwrap(),
        Var::from_tensor(get(&r, "p1_init")).unwrap(),
    ];
    let mut adam = AdamW::new(&vars, 0.9, 0.999, 1e-10, 0.03).unwrap();
    let mut ema = Ema::new(&vars, 0.9).unwrap();
    let norms: Vec<f32> = get(&r, "total_norm").to_vec1().unwrap();
    let lrs: Vec<f32> = get(&r, "lr").to_vec1().unwrap();
    for step in 0..5 {
        // d/dp Σ p·g = g: a store holding exactly the reference gradients.
        let (g0, g1) = (
            get(&r, &format!("g{step}_0")),
            get(&r, &format!("g{step}_1")),
        );
        let probe = ((vars[0].as_tensor() * g0).unwrap().sum_all().unwrap()
            + (vars[1].as_tensor() * g1).unwrap().sum_all().unwrap())
        .unwrap();
        let mut grads: GradStore = probe.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &vars, 0.01).unwrap();
        assert!(
            (norm as f32 - norms[step]).abs() <= 1e-5 * norms[step],
            "step {step}: norm {norm} vs {}",
            norms[step]
        );
        let lr = warmup_lr(2e-3, step as u64, 3);
        assert!(
            (lr as f32 - lrs[step]).abs() <= 1e-9,
            "step {step}: lr {lr} vs {}",
            lrs[step]
        );
        adam.step(&vars, &grads, lr).unwrap();
        ema.update(&vars).unwrap();
        for (i, var) in vars.iter().enumerate() {
            assert_close(
                &format!("p{i} after step {step}"),
                var.as_tensor(),
                get(&r, &format!("p{i}_after{step}")),
                1e-5,
            );
            assert_close(
                &format!("ema{i} after step {step}"),
                &ema.weights[i],
                get(&r, &format!("ema{i}_after{step}")),
                1e-5,
            );
        }
    }
}

#[test]
fn two_training_steps_match_the_official_loop() {
    // As the CLI runs training: subnormals flushed (pixart_runtime::float_env).
    pixart_runtime::float_env::flush_to_zero();
    use pixart_nodes::training::loss::Diffusion;
    use pixart_nodes::training::model::{Start, TrainModel};
    use pixart_nodes::training::optim::AdamW;
    use pixart_nodes::training::step::{loss_and_gradients, Optimizer};
    let (cfg, weights) = tiny_transformer();
    let tm = TrainModel::new(&cfg, Start::Tensors(&weights), 0, 0, &[], &dev()).unwrap();
    let r = reference("train_step.safetensors");
    let batch = fixture_batch(&r);
    assert!(batch.t.contains(&0) && batch.t.contains(&999));
    let diffusion = Diffusion::linear(1e-4, 0.02, 1000);
    let vars = tm.trainable();
    let mut opt = Optimizer {
        adam: AdamW::pixart(&vars).unwrap(),
        vars,
        max_grad_norm: 0.01,
    };
    let norms: Vec<f32> = get(&r, "grad_norm").to_vec1().unwrap();
    for (step, want_norm) in norms.iter().enumerate() {
        let (terms, mean, mut grads) =
            loss_and_gradients(&tm.model, None, &diffusion, &batch, &opt.vars).unwrap();
        if step == 0 {
            assert_close("mse", &terms.mse, get(&r, "mse"), 1e-5);
            assert_close("vb", &terms.vb, get(&r, "vb"), 1e-5);
            assert_close("loss", &terms.loss, get(&r, "loss"), 1e-5);
            let want = get(&r, "loss_mean").to_vec1::<f32>().unwrap()[0] as f64;
            assert!(
                (mean / want - 1.0).abs() < 1e-5,
                "mean loss {mean} vs {want}"
            );
            let largest = tm
                .params
                .iter()
                .map(|p| common::abs_max(get(&r, &format!("grad.{}", p.name))))
                .fold(0f32, f32::max);
            for p in &tm.params {
                let g = grads.get(p.var.as_tensor()).unwrap();
                let want = get(&r, &format!("grad.{}", p.name));
                if analytically_zero(&p.name) {
                    // Adding b to every key shifts a query's scores by q·b: softmax
                    // ignores it, so both sides hold only rounding noise.
                    for (side, t) in [("ours", g), ("reference", want)] {
                        let m = common::abs_max(t);
                        assert!(m <= 1e-6 * largest, "{} ({side}): {m:e}", p.name);
                    }
                } else {
                    assert_close(&format!("gradient of {}", p.name), g, want, 1e-4);
                }
            }
        }
        let norm = opt.apply(&mut grads, 1e-3).unwrap();
        assert!(
            (norm as f32 / want_norm - 1.0).abs() < 1e-5,
            "step {step}: grad norm {norm} vs {want_norm}"
        );
    }
    for p in &tm.params {
        let after = p.var.as_tensor();
        let want = get(&r, &format!("after.{}", p.name));
        if analytically_zero(&p.name) {
            // With eps 1e-10 AdamW turns rounding noise into ±lr steps (in PyTorch
            // too): a key bias random-walks by at most ~lr per step on both sides.
            let start = &weights[&p.name];
            for (side, t) in [("ours", after), ("reference", want)] {
                let moved = common::abs_max(&(t - start).unwrap());
                assert!(moved <= 2.5e-3, "{} ({side}) moved {moved:e}", p.name);
            }
        } else {
            assert_close(&format!("{} after two steps", p.name), after, want, 1e-4);
        }
    }
}

/// Gradient accumulation and activation checkpointing (issue 24) give the
/// plain step on the training fixture: the loss within 1e-5, every gradient
/// within 1e-4 of the plain step's.
#[test]
fn accumulated_and_checkpointed_steps_equal_the_plain_step() {
    use pixart_nodes::training::loss::Diffusion;
    use pixart_nodes::training::model::{Start, TrainModel};
    use pixart_nodes::training::step::{share_gradients, StepPlan};
    let (cfg, weights) = tiny_transformer();
    let tm = TrainModel::new(&cfg, Start::Tensors(&weights), 0, 0, &[], &dev()).unwrap();
    let r = reference("train_step.safetensors");
    let batch = fixture_batch(&r);
    let b = batch.t.len();
    let diffusion = Diffusion::linear(1e-4, 0.02, 1000);
    let vars = tm.trainable();
    let step = |plan| share_gradients(&tm.model, None, &diffusion, &batch, b, &vars, plan).unwrap();
    let (plain_terms, plain, plain_grads) = step(StepPlan::default());
    let largest = tm
        .params
        .iter()
        .map(|p| common::abs_max(plain_grads.get(p.var.as_tensor()).unwrap()))
        .fold(0f32, f32::max);
    for (micro_batches, checkpoint) in [(3, false), (4, false), (1, true), (2, true)] {
        let plan = StepPlan {
            micro_batches,
            checkpoint,
        };
        let (terms, loss, grads) = step(plan);
        assert!(
            (loss / plain - 1.0).abs() < 1e-5,
            "{plan:?}: loss {loss} vs {plain}"
        );
        assert_close(
            &format!("{plan:?}: per-sample loss"),
            &terms.loss,
            &plain_terms.loss,
            1e-5,
        );
        for p in &tm.params {
            let g = grads.get(p.var.as_tensor()).unwrap();
            let want = plain_grads.get(p.var.as_tensor()).unwrap();
            if analytically_zero(&p.name) {
                let m = common::abs_max(g);
                assert!(m <= 1e-6 * largest, "{plan:?}: {}: {m:e}", p.name);
            } else {
                assert_close(&format!("{plan:?}: gradient of {}", p.name), g, want, 1e-4);
            }
        }
    }
}

/// Mixed precision (issue 24): a step computed in bf16 from the f32 master
/// weights is the f32 step up to bf16's rounding. The gradients arrive in f32
/// on the f32 variables, and they differ from f32's (bf16 did run).
///
/// Bounds: bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 2e-3 per
/// value); through the tiny transformer's layers and the backward pass that
/// grows to a few times that, most in the queries' and keys' gradients (the
/// softmax's backward subtracts nearly equal terms). PyTorch's autocast to
/// bf16 on this fixture: loss 3e-4 from f32's, gradients up to 2.5e-2 (to_q).
/// Ours: loss 1e-3, gradients up to 2.1e-2 (4.6e-2 for the ControlNet's to_q).
/// The loss is held within 2⁻⁶ and every gradient within 2⁻⁴ of its largest.
#[test]
fn a_bf16_mixed_precision_step_is_the_f32_step_up_to_bf16_rounding() {
    use pixart_nodes::training::model::{Start, TrainModel};
    use pixart_nodes::training::step::StepPlan;
    let (cfg, weights) = tiny_transformer();
    let tm = TrainModel::new(&cfg, Start::Tensors(&weights), 0, 0, &[], &dev()).unwrap();
    let batch = fixture_batch(&reference("train_step.safetensors"));
    for checkpoint in [false, true] {
        let plan = StepPlan {
            micro_batches: 1,
            checkpoint,
        };
        assert_bf16_step_near_f32(&format!("checkpoint {checkpoint}"), &tm, &batch, plan);
    }
}

/// Mixed precision for what trains beside a frozen transformer: a LoRA's and a
/// ControlNet's bf16 steps are their f32 steps within the bounds above.
#[test]
fn lora_and_controlnet_bf16_mixed_precision_steps_are_their_f32_steps_up_to_bf16_rounding() {
    use pixart_nodes::training::model::{LoraSpec, TrainModel};
    let (cfg, weights) = tiny_transformer();
    let mut batch = fixture_batch(&reference("train_step.safetensors"));
    let spec = LoraSpec {
        rank: 4,
        alpha: 4.0,
        targets: ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec(),
    };
    let lora = TrainModel::new_lora(&cfg, &weights, &spec, None, 0, &dev()).unwrap();
    // B starts at zero, which would leave A without a gradient: give it values.
    fill(&lora, "lora_B.weight", 0.1);
    assert_bf16_step_near_f32("LoRA", &lora, &batch, Default::default());
    let controlnet = TrainModel::new_controlnet(&cfg, &weights, 1, None, &dev()).unwrap();
    // So do the zero-initialised projections for the copied block.
    fill(&controlnet, "_proj.", 0.2);
    batch.control = Some((&batch.x0 * 0.5).unwrap());
    assert_bf16_step_near_f32("ControlNet", &controlnet, &batch, Default::default());
}

/// Sets the parameters whose names contain `part` to spread values in ±scale/2.
fn fill(tm: &pixart_nodes::training::model::TrainModel, part: &str, scale: f32) {
    for p in tm.params.iter().filter(|p| p.name.contains(part)) {
        let t = p.var.as_tensor();
        let v: Vec<f32> = (0..t.elem_count())
            .map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * scale)
            .collect();
        p.var
            .set(&Tensor::from_vec(v, t.shape(), &dev()).unwrap())
            .unwrap();
    }
}

/// `tm`'s step on `batch` computed in bf16 (its `compute_copy`) against the
/// same step in f32: loss within 2⁻⁶, gradients f32 and within 2⁻⁴ of their
/// largest value, and not all equal.
fn assert_bf16_step_near_f32(
    what: &str,
    tm: &pixart_nodes::training::model::TrainModel,
    batch: &pixart_nodes::training::step::Batch,
    plan: pixart_nodes::training::step::StepPlan,
) {
    use pixart_nodes::training::loss::Diffusion;
    use pixart_nodes::training::step::share_gradients;
    let diffusion = Diffusion::linear(1e-4, 0.02, 1000);
    let (b, vars) = (batch.t.len(), tm.trainable());
    let step = |model, net| share_gradients(model, net, &diffusion, batch, b, &vars, plan).unwrap();
    let (f32_terms, f32_loss, f32_grads) = step(&tm.model, tm.controlnet.as_ref());
    let (model, net) = tm.compute_copy(DType::BF16).unwrap();
    assert_eq!(model.dtype(), DType::BF16, "{what}");
    assert_eq!(net.is_some(), tm.controlnet.is_some(), "{what}");
    let (terms, loss, grads) = step(&model, net.as_ref());
    let tol = 1.0 / 64.0;
    assert!(
        (loss / f32_loss - 1.0).abs() < tol,
        "{what}: loss {loss} vs f32 {f32_loss}"
    );
    assert_close(
        &format!("{what}: per-sample loss"),
        &terms.loss,
        &f32_terms.loss,
        tol as f32,
    );
    let mut largest = 0f32;
    for p in &tm.params {
        assert_eq!(
            p.var.dtype(),
            DType::F32,
            "{what}: master weight {}",
            p.name
        );
        let g = grads.get(p.var.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::F32, "{what}: gradient of {}", p.name);
        let want = f32_grads.get(p.var.as_tensor()).unwrap();
        if analytically_zero(&p.name) {
            continue;
        }
        assert!(
            common::abs_max(want) > 0.0,
            "{what}: {} has no gradient",
            p.name
        );
        let e = common::rel_err(g, want);
        largest = largest.max(e);
        assert!(
            e <= 1.0 / 16.0,
            "{what}: gradient of {}: relative error {e:e}",
            p.name
        );
    }
    assert!(
        largest > 0.0,
        "{what}: the gradients equal f32's: bf16 did not run"
    );
    eprintln!(
        "{what}: bf16 loss {:e} from f32's, largest gradient error {largest:e}",
        loss / f32_loss - 1.0
    );
}

/// The training fixture's batch (`train_step.safetensors`).
fn fixture_batch(r: &HashMap<String, Tensor>) -> pixart_nodes::training::step::Batch {
    pixart_nodes::training::step::Batch {
        x0: get(r, "x_start").clone(),
        t: get(r, "t")
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&t| t as usize)
            .collect(),
        noise: get(r, "noise").clone(),
        text: get(r, "text").clone(),
        mask: get(r, "mask").to_dtype(DType::F32).unwrap(),
        sizes: None,
        mse_weights: None,
        control: None,
    }
}

/// Parameters whose exact gradient is zero: the attention key biases.
fn analytically_zero(name: &str) -> bool {
    name.ends_with(".to_k.bias")
}

/// The tiny fixture transformer's config and weights.
fn tiny_transformer() -> (pixart_models::pixart::Config, HashMap<String, Tensor>) {
    let dir = fixtures().join("tiny-pixart/transformer");
    let cfg = pixart_models::weights::read_config(&dir).unwrap();
    let weights = pixart_runtime::candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &dev(),
    )
    .unwrap();
    (cfg, weights)
}

/// The fixture's KV-compressed Σ transformer, loaded with `sampling` in its config.
fn kv_transformer(
    sampling: &str,
) -> (
    tempfile::TempDir,
    std::sync::Arc<pixart_nodes::pixart::Denoiser>,
) {
    let from = fixtures().join("tiny-pixart-sigma-kv/transformer");
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    config["kv_compress_config"]["sampling"] = sampling.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        from.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let den = load::transformer(dir.path(), DType::F32, &dev()).unwrap();
    (dir, den)
}

#[test]
fn sigma_kv_compression_matches_the_official_attention_for_every_sampling() {
    let r = reference("kv_compress.safetensors");
    let cases = [
        ("conv", "square"),
        ("conv", "wide"),
        ("conv", "odd"),
        ("ave", "odd"),
        ("uniform", "wide"),
        ("uniform_every", "wide"),
    ];
    for (sampling, shape) in cases {
        let (_dir, den) = kv_transformer(sampling);
        let case = format!("{sampling}.{shape}");
        let want = get(&r, &format!("{case}.out"));
        assert_close(&case, &run_transformer(&den, &r, &case), want, 1e-4);
        // The training forward (differentiable ops) computes the same.
        let k = |n: &str| get(&r, &format!("{case}.{n}")).clone();
        let train = den
            .model
            .forward_train(&k("x"), &k("t"), &k("text"), Some(&k("mask")), None)
            .unwrap();
        assert_close(&format!("{case} (training ops)"), &train, want, 1e-4);
    }

    // The official `uniform` cannot reshape a grid that does not divide: a clear error.
    let (_dir, den) = kv_transformer("uniform");
    let k = |n: &str| get(&r, &format!("conv.odd.{n}")).clone();
    let err = den
        .model
        .forward(&k("x"), &k("t"), &k("text"), Some(&k("mask")), None)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("7×10 token grid does not divide by 2"),
        "{err}"
    );

    // Unknown samplings and blocks that do not exist are refused at load.
    for (field, value, says) in [
        ("sampling", serde_json::json!("bilinear"), "not one of"),
        ("kv_compress_layer", serde_json::json!([5]), "names block 5"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let from = fixtures().join("tiny-pixart-sigma-kv/transformer");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap())
                .unwrap();
        config["kv_compress_config"][field] = value;
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        std::fs::copy(
            from.join("diffusion_pytorch_model.safetensors"),
            dir.path().join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let err = load::transformer(dir.path(), DType::F32, &dev())
            .err()
            .unwrap();
        assert!(err.to_string().contains(says), "{err}");
    }
}

/// An official KV-compressed checkpoint (`blocks.N.attn.sr` / `attn.norm`) next to a
/// plain diffusers config: the compression is read off its weights.
#[test]
fn official_kv_compressed_checkpoints_load_unchanged() {
    let r = reference("kv_compress.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("PixArt-Sigma-kv.pth");
    std::fs::copy(fixtures().join("tiny-pixart-sigma-kv-official.pth"), &pth).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-pixart-sigma-kv/transformer/config.json"))
            .unwrap(),
    )
    .unwrap();
    config.as_object_mut().unwrap().remove("kv_compress_config");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let den = load::transformer(&pth, DType::F32, &dev()).unwrap();
    let kv = den.model.config().kv_compress_config.clone().unwrap();
    assert_eq!(
        (
            kv.sampling.as_deref(),
            kv.scale_factor,
            kv.kv_compress_layer
        ),
        (Some("conv"), 2, vec![1])
    );
    for case in ["conv.square", "conv.wide"] {
        check_transformer_case(&den, &r, case, case);
    }
}

/// PixArt-α-DMD's one-step call: DDPMScheduler's predicted x0 at timestep 400
/// (clamped or not, as its config says), and the whole pipeline call diffusers
/// documents (`timesteps=[400]`, one step, guidance 1) on tiny-pixart.
#[test]
fn dmd_one_step_matches_diffusers() {
    let r = reference("dmd.safetensors");
    for clip in [false, true] {
        let config: SchedulerConfig = serde_json::from_value(serde_json::json!({
            "_class_name": "DDPMScheduler",
            "clip_sample": clip,
            "variance_type": "fixed_small",
            "timestep_spacing": "leading",
        }))
        .unwrap();
        assert_eq!(config.default_sampler(), "dmd");
        let mut sampler = config.start("dmd", 1).unwrap();
        assert_eq!(sampler.timesteps(), &[400.0]);
        let name = if clip { "clip" } else { "noclip" };
        let k = |n: &str| get(&r, &format!("step.{name}.{n}")).clone();
        let x0 = sampler.step(&k("eps"), &k("x"), None).unwrap();
        assert_close(&format!("dmd step ({name})"), &x0, &k("x0"), 1e-4);
    }

    let (den, mut choice, pos, _neg) = sampling_parts(&fixtures().join("tiny-pixart"), 120);
    choice.config.class_name = "DDPMScheduler".into();
    choice.config.clip_sample = Some(false);
    let req = Request {
        positive: &pos,
        negative: None,
        guidance: 1.0,
        width: 256,
        height: 256,
        seed: 0,
        latents: Some(get(&r, "pipeline.latents").clone()),
        resolution_binning: false,
        vae_scale: 8,
        init: None,
    };
    let mut sampler = choice.config.start("dmd", 1).unwrap();
    let latents = sample(&den, sampler.as_mut(), &req, |_| Ok(())).unwrap();
    assert_close(
        "dmd pipeline",
        &latents,
        get(&r, "pipeline.final_latents"),
        1e-4,
    );

    // More than one step is a clear error, not a silently wrong picture.
    let err = choice.config.start("dmd", 20).err().unwrap();
    assert!(err.contains("exactly one step"), "{err}");
}

/// The NCCL path of multi-GPU training (issue 24) on a machine with one GPU: a
/// communicator of this process alone sums tensors in place (a whole buffer and
/// a slice of one, as the gradients' flat buffer is), which leaves their values
/// as they are; what it cannot sum is refused with a message.
#[cfg(feature = "nccl")]
#[test]
fn nccl_sums_on_the_gpu_in_a_communicator_of_one() {
    use pixart_nodes::distributed::Nccl;
    let Device::Cuda(cuda) = dev() else {
        eprintln!("skipped: NCCL needs PIXART_TEST_DEVICE=cuda");
        return;
    };
    let nccl = Nccl::single(&cuda).unwrap();
    let values: Vec<f32> = (0..4099).map(|i| i as f32 * 0.25 - 300.0).collect();
    let whole = Tensor::from_vec(values.clone(), values.len(), &dev()).unwrap();
    nccl.sum_in_place(&whole).unwrap();
    assert_eq!(whole.to_vec1::<f32>().unwrap(), values);
    let part = whole.narrow(0, 1000, 77).unwrap();
    nccl.sum_in_place(&part).unwrap();
    assert_eq!(part.to_vec1::<f32>().unwrap(), values[1000..1077]);
    let strided = whole
        .narrow(0, 0, 4096)
        .unwrap()
        .reshape((64, 64))
        .unwrap()
        .t()
        .unwrap();
    assert!(nccl
        .sum_in_place(&strided)
        .unwrap_err()
        .contains("contiguous f32"));
    let half = whole.to_dtype(DType::F16).unwrap();
    assert!(nccl
        .sum_in_place(&half)
        .unwrap_err()
        .contains("contiguous f32"));
}
