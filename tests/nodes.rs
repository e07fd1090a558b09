//! The built-in nodes, run through workflows as a user would.

mod common;

use common::{load, load_with, registry};
use pixart_nodes::image_io::{PNG_PARAMS_KEY, PNG_WORKFLOW_KEY};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use pixart_runtime::executor::{CachePolicy, Executor, RunOptions, RunReport};
use pixart_runtime::{Value, Workflow};
use std::path::{Path, PathBuf};

async fn run_in(wf: &Workflow, dir: &Path) -> RunReport {
    let exec = Executor::new(CachePolicy::None);
    let opts = RunOptions {
        out_dir: dir.into(),
        base_dir: dir.into(),
        ..RunOptions::default()
    };
    exec.run(wf, opts).await.unwrap()
}

fn tensor(report: &RunReport, node: &str, output: &str) -> Tensor {
    match report.output(node, output) {
        Some(Value::Tensor(t) | Value::Image(t)) => t.clone(),
        Some(Value::Latents(l)) => l.tensor.clone(),
        other => panic!("{node}.{output}: {other:?}"),
    }
}

#[test]
fn gaussian_noise_is_bit_identical_to_the_reference_stream() {
    // Fixed forever: changing these changes every seeded image of every user.
    let bits: Vec<u32> = pixart_nodes::noise::gaussian(0, 6)
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(
        bits,
        [1060248470, 1066052370, 1034309015, 3203254456, 1049204594, 1067351566]
    );
    let bits: Vec<u32> = pixart_nodes::noise::gaussian(42, 3)
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(bits, [3197041662, 3212849248, 1063905958]);
}

const NOISE_ROUNDTRIP: &str = "version: 1
params:
  seed: {type: int, default: 0, min: 0}
  dtype: {type: enum, choices: [f32, f16, bf16], default: f32}
nodes:
  noise:
    type: noise.gaussian
    inputs: {shape: [2, 3], seed: \"${params.seed}\", dtype: \"${params.dtype}\"}
  save:
    type: tensor.save
    inputs: {tensor: \"${noise.tensor}\", path: \"t/noise-${params.seed}.safetensors\", key: latents}
  load:
    type: tensor.load
    inputs: {path: \"${save.path}\"}
  again:
    type: tensor.save
    inputs: {tensor: \"${load.tensor}\", path: t/again.safetensors}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_saves_and_loads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    for dtype in ["f32", "f16", "bf16"] {
        let wf = load_with(NOISE_ROUNDTRIP, &reg, &[("seed", "7"), ("dtype", dtype)]);
        let report = run_in(&wf, dir.path()).await;
        assert!(report.ok(), "{:?}", report.failures);
        let made = tensor(&report, "noise", "tensor");
        let loaded = tensor(&report, "load", "tensor");
        assert_eq!(made.dims(), [2, 3]);
        assert_eq!(loaded.dtype(), made.dtype());
        let a = made
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = loaded
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let reference = pixart_nodes::noise::gaussian(7, 6);
        let tol = if dtype == "f32" { 0.0 } else { 0.01 };
        assert!(a
            .iter()
            .zip(&reference)
            .all(|(x, r)| (x - r).abs() <= tol * r.abs().max(1.0)));
    }
    let bytes = std::fs::read(dir.path().join("t/noise-7.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let params = &meta.metadata().as_ref().unwrap()["pixart.params"];
    assert!(params.contains("\"seed\":7"), "{params}");
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("t"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.ends_with(".safetensors")),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_load_errors_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let two = std::collections::HashMap::from([
        ("alpha".to_string(), t.clone()),
        ("beta".to_string(), t),
    ]);
    pixart_runtime::candle_core::safetensors::save(&two, dir.path().join("two.safetensors"))
        .unwrap();
    std::fs::write(dir.path().join("junk.safetensors"), b"not a tensor file").unwrap();

    let case = |path: &str, key: Option<&str>| {
        let key = key.map(|k| format!(", key: {k}")).unwrap_or_default();
        format!(
            "version: 1\nnodes:\n  l: {{type: tensor.load, inputs: {{path: {path}{key}}}}}\n  s: {{type: tensor.save, inputs: {{tensor: \"${{l.tensor}}\", path: o.safetensors}}}}\n"
        )
    };
    let failure = |report: RunReport| {
        report
            .failures
            .into_iter()
            .next()
            .expect("a failure")
            .message
    };

    let msg = failure(
        run_in(
            &load(&case("two.safetensors", Some("alpa")), &reg),
            dir.path(),
        )
        .await,
    );
    assert!(
        msg.contains("no tensor `alpa`") && msg.contains("did you mean `alpha`"),
        "{msg}"
    );
    let msg = failure(run_in(&load(&case("two.safetensors", None), &reg), dir.path()).await);
    assert!(
        msg.contains("holds 2 tensors") && msg.contains("alpha, beta"),
        "{msg}"
    );
    let msg = failure(run_in(&load(&case("junk.safetensors", None), &reg), dir.path()).await);
    assert!(
        msg.contains("junk.safetensors") && msg.contains("not a readable safetensors file"),
        "{msg}"
    );
    let msg = failure(run_in(&load(&case("missing.safetensors", None), &reg), dir.path()).await);
    assert!(msg.contains("missing.safetensors"), "{msg}");
    let ok = run_in(
        &load(&case("two.safetensors", Some("beta")), &reg),
        dir.path(),
    )
    .await;
    assert!(ok.ok());
}

const IMAGES: &str = "version: 1
params: {seed: 3}
nodes:
  noise: {type: noise.gaussian, inputs: {shape: [2, 3, 8, 6], seed: \"${params.seed}\"}}
  img: {type: image.from_tensor, inputs: {tensor: \"${noise.tensor}\"}}
  save: {type: image.save, inputs: {image: \"${img.image}\", path: \"pics/noise.png\"}}
  back: {type: image.to_tensor, inputs: {image: \"${img.image}\"}}
  keep: {type: tensor.save, inputs: {tensor: \"${back.tensor}\", path: back.safetensors}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_save_with_the_workflow_and_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    let wf = load(IMAGES, &reg);
    let report = run_in(&wf, dir.path()).await;
    assert!(report.ok(), "{:?}", report.failures);

    let paths: Vec<PathBuf> = match report.output("save", "paths") {
        Some(Value::List(items)) => items
            .iter()
            .map(|v| match v {
                Value::Path(p) => p.clone(),
                other => panic!("{other:?}"),
            })
            .collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        paths,
        [
            dir.path().join("pics/noise-0000.png"),
            dir.path().join("pics/noise-0001.png")
        ]
    );

    // The PNG carries the workflow and the params.
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&paths[1]).unwrap(),
    ));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (6, 8));
    let text = |key: &str| {
        info.utf8_text
            .iter()
            .find(|t| t.keyword == key)
            .map(|t| t.get_text().unwrap())
            .unwrap_or_else(|| panic!("no {key} chunk"))
    };
    assert_eq!(text(PNG_WORKFLOW_KEY), IMAGES);
    assert_eq!(text(PNG_PARAMS_KEY), "{\"seed\":3}");

    // Loading gives the saved bytes: the image, rounded to 8 bits.
    let img = tensor(&report, "img", "image");
    let second = img.narrow(0, 1, 1).unwrap();
    let load_yaml = format!(
        "version: 1\nnodes:\n  l: {{type: image.load, inputs: {{path: \"{}\"}}}}\n",
        paths[1].display()
    );
    let loaded_report = run_in(&load(&load_yaml, &reg), dir.path()).await;
    let loaded = tensor(&loaded_report, "l", "image");
    assert_eq!(loaded.dims(), [1, 8, 6, 3]);
    assert_eq!(
        loaded_report.output("l", "width").and_then(Value::as_int),
        Some(6)
    );
    let expect: Vec<f32> = second
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() / 255.0)
        .collect();
    let got = loaded.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(expect.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-6));

    // image.to_tensor inverts image.from_tensor (inside the clamp).
    let noise = tensor(&report, "noise", "tensor")
        .clamp(-1f32, 1f32)
        .unwrap();
    let back = tensor(&report, "back", "tensor");
    let diff = common::max_abs_diff(&noise, &back);
    assert!(diff < 1e-6, "{diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_inputs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fake.png"), b"\x89PNG not really").unwrap();
    let (reg, _) = registry();
    let yaml = "version: 1\nnodes:\n  l: {type: image.load, inputs: {path: fake.png}}\n  s: {type: image.save, inputs: {image: \"${l.image}\", path: x.png}}\n";
    let report = run_in(&load(yaml, &reg), dir.path()).await;
    let msg = &report.failures[0].message;
    assert!(
        msg.contains("fake.png") && msg.contains("cannot decode"),
        "{msg}"
    );
    // A tensor with 2 channels is not an image.
    let yaml = "version: 1\nnodes:\n  n: {type: noise.gaussian, inputs: {shape: [1, 2, 4, 4]}}\n  i: {type: image.from_tensor, inputs: {tensor: \"${n.tensor}\"}}\n  s: {type: image.save, inputs: {image: \"${i.image}\", path: x.png}}\n";
    let report = run_in(&load(yaml, &reg), dir.path()).await;
    assert!(
        report.failures[0].message.contains("1|3|4 channels"),
        "{:?}",
        report.failures
    );
    // A shape too large to allocate is refused before allocating.
    let yaml = "version: 1\nnodes:\n  n: {type: noise.gaussian, inputs: {shape: [100000, 100000, 100000]}}\n  s: {type: tensor.save, inputs: {tensor: \"${n.tensor}\", path: x.safetensors}}\n";
    let report = run_in(&load(yaml, &reg), dir.path()).await;
    assert!(
        report.failures[0].message.contains("more than"),
        "{:?}",
        report.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn math_format_and_text_with_interpolated_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    let yaml = "version: 1
params: {w: 3, h: 4}
nodes:
  area: {type: math.int, inputs: {op: mul, a: \"${params.w}\", b: \"${params.h}\"}}
  half: {type: math.float, inputs: {op: div, a: \"${area.result}\", b: 8}}
  label: {type: string.format, inputs: {template: \"{a} px, ratio {b:.3}\", a: \"${area.result}\", b: \"${half.result}\"}}
  save: {type: text.save, inputs: {text: \"${label.text}\", path: \"notes/area-${area.result}.txt\"}}
  boom: {type: math.int, inputs: {op: div, a: 1, b: 0}}
  boom_save: {type: text.save, inputs: {text: \"${boom.result}!\", path: boom.txt}}
";
    let report = run_in(&load(yaml, &reg), dir.path()).await;
    let written = std::fs::read_to_string(dir.path().join("notes/area-12.txt")).unwrap();
    assert_eq!(written, "12 px, ratio 1.500");
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].node, "boom");
    assert!(report.failures[0].message.contains("division by zero"));
    assert!(!dir.path().join("boom.txt").exists());
}

#[test]
fn every_builtin_declaration_is_valid_and_documented() {
    let reg = pixart_nodes::builtin_registry();
    assert!(reg.len() >= 15);
    for spec in reg.catalog() {
        spec.check().unwrap();
        assert!(
            !spec.category.is_empty() && !spec.description.is_empty(),
            "{}",
            spec.id()
        );
        assert!(!spec.outputs.is_empty(), "{}", spec.id());
    }
}
