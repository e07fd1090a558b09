//! The LLaVA captioner against transformers on the tiny random LLaVA that
//! `tests/fixtures/generate_llava.py` builds: processed pixel values, input ids,
//! image features and first-step logits within 1e-4 (relative to the largest
//! reference value), the greedy caption's token ids and text exactly.

mod common;

use pixart_nodes::captioner::{Captioner, Generation};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> (std::collections::HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("reference");
    let tensors =
        pixart_runtime::candle_core::safetensors::load(dir.join("llava.safetensors"), &Device::Cpu)
            .unwrap();
    let json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("llava.json")).unwrap()).unwrap();
    (tensors, json)
}

/// An 8-bit RGB PNG as (bytes, width, height).
fn rgb(path: &Path) -> (Vec<u8>, usize, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (buf, info.width as usize, info.height as usize)
}

#[test]
fn tiny_llava_matches_transformers() {
    let captioner =
        Captioner::load(&fixtures().join("tiny-llava"), DType::F32, &Device::Cpu).unwrap();
    let (tensors, json) = reference();
    let cases = json["cases"].as_array().unwrap();
    let max_tokens = json["max_new_tokens"].as_u64().unwrap() as usize;
    assert_eq!(cases.len(), 3);
    for (i, case) in cases.iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let text = captioner.prompt_text(prompt).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case {i}: chat template"
        );

        let ids = captioner.input_ids(&text).unwrap();
        let want_ids: Vec<u32> = tensors[&format!("input_ids_{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        assert_eq!(ids, want_ids, "case {i}: input ids");

        let (bytes, w, h) = rgb(&fixtures()
            .join("reference")
            .join(case["image"].as_str().unwrap()));
        assert_eq!(
            [w, h],
            [
                case["size"][0].as_u64().unwrap() as usize,
                case["size"][1].as_u64().unwrap() as usize
            ]
        );
        let px = captioner.pixel_values(&bytes, w, h).unwrap();
        let e = common::rel_err(&px, &tensors[&format!("pixel_values_{i}")]);
        assert!(e <= 1e-4, "case {i}: pixel values, relative error {e:e}");

        let features = captioner.image_features(&px).unwrap().squeeze(0).unwrap();
        let e = common::rel_err(&features, &tensors[&format!("image_features_{i}")]);
        assert!(e <= 1e-4, "case {i}: image features, relative error {e:e}");

        let logits = captioner
            .first_logits(&ids, &px)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let e = common::rel_err(&logits, &tensors[&format!("logits_{i}")]);
        assert!(
            e <= 1e-4,
            "case {i}: first-step logits, relative error {e:e}"
        );

        let opts = Generation {
            max_tokens,
            temperature: 0.0,
            seed: 0,
        };
        let caption = captioner
            .caption(&bytes, w, h, prompt, &opts, |_, _| Ok(()))
            .unwrap();
        let want: Vec<u32> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(caption.ids, want, "case {i}: greedy ids");
        assert_eq!(
            caption.text,
            case["caption"].as_str().unwrap(),
            "case {i}: caption text"
        );
        eprintln!(
            "case {i} ({w}×{h}): {} prompt tokens, caption {:?} ({} tokens)",
            ids.len(),
            caption.text,
            caption.ids.len()
        );
    }
    assert!(
        cases.iter().any(|c| c["stopped_at_eos"].as_bool().unwrap()),
        "one fixture case stops at end-of-sequence"
    );
}

/// llava-hf/llava-1.5-7b-hf's chat template as the hub publishes it (its
/// `chat_template.json`), with transformers' `{% generation %}` tag around the
/// assistant's text.
const LLAVA_15_CHAT_TEMPLATE: &str = r#"{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>
' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"#;

/// The tiny LLaVA folder with its chat template swapped for the published one,
/// as `chat_template.json` (the hub's layout).
fn llava_with_published_template(dir: &Path) {
    for entry in std::fs::read_dir(fixtures().join("tiny-llava")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "chat_template.jinja" {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let json = serde_json::json!({ "chat_template": LLAVA_15_CHAT_TEMPLATE });
    std::fs::write(dir.join("chat_template.json"), json.to_string()).unwrap();
}

/// The published template renders a single image-and-prompt turn exactly as the
/// fixture's own template (which transformers rendered for the reference), so
/// the captions must be the reference's, token for token.
#[test]
fn the_published_llava_15_template_loads_and_captions() {
    let dir = tempfile::tempdir().unwrap();
    llava_with_published_template(dir.path());
    let captioner = Captioner::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let (_, json) = reference();
    let case = &json["cases"][0];
    let prompt = case["prompt"].as_str().unwrap();
    assert_eq!(
        captioner.prompt_text(prompt).unwrap(),
        case["text"].as_str().unwrap()
    );
    assert_eq!(
        captioner
            .prompt_text("What is shown in this image?")
            .unwrap(),
        "USER: <image>\nWhat is shown in this image? ASSISTANT:",
        "as transformers renders the published template"
    );
    let (bytes, w, h) = rgb(&fixtures()
        .join("reference")
        .join(case["image"].as_str().unwrap()));
    let opts = Generation {
        max_tokens: json["max_new_tokens"].as_u64().unwrap() as usize,
        temperature: 0.0,
        seed: 0,
    };
    let caption = captioner
        .caption(&bytes, w, h, prompt, &opts, |_, _| Ok(()))
        .unwrap();
    assert_eq!(caption.text, case["caption"].as_str().unwrap());
}

/// `captioner.load` puts the model in the model cache at its weights' size, so
/// the cache's memory budget sees it.
#[test]
fn the_captioner_counts_its_weights_in_the_model_cache() {
    use pixart_nodes::model_cache;
    use pixart_runtime::{NodeContext, Value};
    let folder = fixtures().join("tiny-llava");
    let node = pixart_nodes::builtin_registry()
        .lookup("captioner.load")
        .unwrap();
    let inputs = pixart_runtime::Inputs::from_pairs(
        node.clone(),
        vec![("path", Value::Path(folder.clone()))],
    )
    .unwrap();
    let ctx = NodeContext::detached(fixtures(), std::env::temp_dir());
    node.run(&ctx, inputs).unwrap();

    let file = std::fs::read(folder.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&file).unwrap();
    let f32_bytes: usize = tensors
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>() * 4)
        .sum();
    let key = model_cache::key("llava", &folder, DType::F32, &Device::Cpu);
    let counted = model_cache::global().lock().unwrap().bytes(&key);
    assert_eq!(counted, Some(f32_bytes));
}

/// The issue's workflow, as written (paths pointed at the fixtures).
#[test]
fn the_issue_workflow_captions_an_image() {
    let out = tempfile::tempdir().unwrap();
    let wf = out.path().join("cat.yaml");
    let fx = fixtures();
    std::fs::write(
        &wf,
        format!(
            r#"version: 1
nodes:
  cap:  {{type: captioner.load, inputs: {{path: "{}"}}}}
  img:  {{type: image.load, inputs: {{path: "{}"}}}}
  text:
    type: caption.generate
    inputs: {{captioner: "${{cap.captioner}}", image: "${{img.image}}", prompt: "Describe this image and its style in a very detailed manner.", max_tokens: 120, temperature: 0}}
  save: {{type: text.save, inputs: {{text: "${{text.text}}", path: "out/cat.txt"}}}}
"#,
            fx.join("tiny-llava").display(),
            fx.join("reference/llava-0.png").display()
        ),
    )
    .unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_pixart"))
        .arg("run")
        .arg(&wf)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let written = std::fs::read_to_string(out.path().join("out/cat.txt")).unwrap();
    let captioner = Captioner::load(&fx.join("tiny-llava"), DType::F32, &Device::Cpu).unwrap();
    let (bytes, w, h) = rgb(&fx.join("reference/llava-0.png"));
    let opts = Generation {
        max_tokens: 120,
        temperature: 0.0,
        seed: 0,
    };
    let want = captioner
        .caption(
            &bytes,
            w,
            h,
            "Describe this image and its style in a very detailed manner.",
            &opts,
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(written, want.text);
    assert!(!written.is_empty());

    // Sampling is seeded: the same seed gives the same caption, another seed another.
    let hot = |seed| Generation {
        max_tokens: 24,
        temperature: 1.0,
        seed,
    };
    let a = captioner
        .caption(&bytes, w, h, "What is in the picture?", &hot(1), |_, _| {
            Ok(())
        })
        .unwrap();
    let b = captioner
        .caption(&bytes, w, h, "What is in the picture?", &hot(1), |_, _| {
            Ok(())
        })
        .unwrap();
    let c = captioner
        .caption(&bytes, w, h, "What is in the picture?", &hot(2), |_, _| {
            Ok(())
        })
        .unwrap();
    assert_eq!(a, b);
    assert_ne!(a.ids, c.ids);
}

#[test]
fn other_folders_are_clear_errors() {
    let fx = fixtures();
    let err = |dir: &Path| {
        Captioner::load(dir, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    // A PixArt transformer folder is not a LLaVA.
    let e = err(&fx.join("tiny-pixart/transformer"));
    assert!(e.contains("config.json") && e.contains("model_type"), "{e}");
    // A LLaVA folder missing its tokenizer.
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(fx.join("tiny-llava").join(f), dir.path().join(f)).unwrap();
    }
    let e = err(dir.path());
    assert!(e.contains("tokenizer.json"), "{e}");
    // A damaged checkpoint names the missing tensor instead of panicking.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fx.join("tiny-llava")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let tensors = pixart_runtime::candle_core::safetensors::load(
        fx.join("tiny-llava/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .filter(|(k, _)| !k.contains("layers.1.mlp.down_proj"))
    .collect::<std::collections::HashMap<_, _>>();
    pixart_runtime::candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))
        .unwrap();
    let e = err(dir.path());
    assert!(e.contains("layers.1.mlp.down_proj"), "{e}");
    // A config.json that does not fit the weights names the first tensor that differs.
    std::fs::copy(
        fx.join("tiny-llava/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fx.join("tiny-llava/config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"intermediate_size\": 96", "\"intermediate_size\": 97"),
    )
    .unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("layers.0.mlp.gate_proj.weight has shape [96, 48]"),
        "{e}"
    );
}

/// A folder of `n` small images with short captions, as the trainer reads them.
fn image_folder(dir: &Path, n: usize) {
    for i in 0..n {
        let mut pixels = Vec::with_capacity(32 * 32 * 3);
        for y in 0..32u32 {
            for x in 0..32u32 {
                pixels.extend([(x * 8 + i as u32 * 13) as u8, (y * 8) as u8, (i * 40) as u8]);
            }
        }
        let file = std::fs::File::create(dir.join(format!("img{i:04}.png"))).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 32, 32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&pixels)
            .unwrap();
        std::fs::write(dir.join(format!("img{i:04}.txt")), format!("square {i}")).unwrap();
    }
}

fn caption_run(folder: &Path, out: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pixart"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "workflows/caption-dataset.yaml", "--set"])
        .arg(format!("model={}", fixtures().join("tiny-llava").display()))
        .arg("--set")
        .arg(format!("folder={}", folder.display()))
        .args(["--set", "use_original=true", "--set", "batch=3", "--out"])
        .arg(out);
    cmd
}

/// `workflows/caption-dataset.yaml` relabels a folder; killed half-way, a rerun
/// finishes it without redoing or losing a caption.
#[test]
fn caption_dataset_workflow_survives_a_kill_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("images");
    std::fs::create_dir(&folder).unwrap();
    let n = 150;
    image_folder(&folder, n);
    let done = |folder: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".orig.txt"))
            .filter(|p| {
                let txt = PathBuf::from(p.to_string_lossy().replace(".orig.txt", ".txt"));
                std::fs::read_to_string(&txt).unwrap() != std::fs::read_to_string(p).unwrap()
            })
            .collect();
        v.sort();
        v
    };
    let mut child = caption_run(&folder, dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while done(&folder).len() < 5 {
        assert!(started.elapsed().as_secs() < 120, "no captions appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before_kill: Vec<(PathBuf, String, std::time::SystemTime)> = done(&folder)
        .into_iter()
        .map(|orig| {
            let txt = PathBuf::from(orig.to_string_lossy().replace(".orig.txt", ".txt"));
            let text = std::fs::read_to_string(&txt).unwrap();
            let mtime = std::fs::metadata(&txt).unwrap().modified().unwrap();
            (txt, text, mtime)
        })
        .collect();
    assert!(
        before_kill.len() < n,
        "the run finished before it could be killed; make the folder larger"
    );
    eprintln!("killed after {} of {n} captions", before_kill.len());

    let out = caption_run(&folder, dir.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(done(&folder).len(), n, "every image has a dense caption");
    for (txt, text, mtime) in &before_kill {
        assert_eq!(
            &std::fs::read_to_string(txt).unwrap(),
            text,
            "{} was redone",
            txt.display()
        );
        assert_eq!(&std::fs::metadata(txt).unwrap().modified().unwrap(), mtime);
    }
    for i in 0..n {
        let orig = std::fs::read_to_string(folder.join(format!("img{i:04}.orig.txt"))).unwrap();
        assert_eq!(orig, format!("square {i}"), "the original caption is kept");
    }
    let report = std::fs::read_to_string(dir.path().join("caption-report.txt")).unwrap();
    assert!(
        report.contains(&format!("before: {n} captions (original)")),
        "{report}"
    );
    assert!(
        report.contains(&format!("after:  {n} captions (current)")),
        "{report}"
    );
    eprint!("{report}");
}

/// Half precision on the CPU: the same model in f16 gives logits close to f32's
/// (f16 has 11 bits of mantissa; errors add up over the layers).
#[test]
fn half_precision_stays_close() {
    let dir = fixtures().join("tiny-llava");
    let f32m = Captioner::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let f16m = Captioner::load(&dir, DType::F16, &Device::Cpu).unwrap();
    let (bytes, w, h) = rgb(&fixtures().join("reference/llava-2.png"));
    let ids = f32m
        .input_ids(&f32m.prompt_text("What is in the picture?").unwrap())
        .unwrap();
    let px = f32m.pixel_values(&bytes, w, h).unwrap();
    let a = f32m.first_logits(&ids, &px).unwrap();
    let b = f16m.first_logits(&ids, &px).unwrap();
    let e = common::rel_err(&b, &a);
    assert!(
        e > 0.0 && e < 2e-2,
        "f16 vs f32 logits: relative error {e:e}"
    );
}
