//! WebAssembly plugins: the example plugins are built from source (Debian's
//! rustc-web, see plugins/README.md), loaded, listed and run in workflows next
//! to built-in nodes; hostile plugins end in clean errors and leave the host
//! working.

use pixart_plugins::{Limits, Plugin, PluginHost, PluginNode, PluginOptions};
use pixart_runtime::candle_core::{Device, Tensor};
use pixart_runtime::executor::{CachePolicy, Executor, RunOptions};
use pixart_runtime::workflow::{load_workflow, LoadOptions};
use pixart_runtime::{CancellationToken, Inputs, Latents, Node, NodeContext, NodeError, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DEBIAN_RUST: &str =
    "apt-get install -y rustc-web cargo-web rust-web-src rust-web-llvm lld-22";

/// Builds plugins/examples once per test binary and returns the folder with
/// the `.wasm` components.
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(ROOT);
        let linker = "/usr/lib/rustlib/x86_64-unknown-linux-gnu/bin/wasm-component-ld";
        for needed in ["/usr/bin/rustc", "/usr/bin/cargo", linker] {
            assert!(
                Path::new(needed).exists(),
                "building the example plugins needs {needed}: {DEBIAN_RUST} (plugins/README.md)"
            );
        }
        let target_dir = root.join("target/wasm-plugins");
        let mut cmd = Command::new("/usr/bin/cargo");
        // The outer cargo's settings are for the host: none may reach the wasm build.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_MAKEFLAGS",
            "MAKEFLAGS",
            "MFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO",
        ] {
            cmd.env_remove(var);
        }
        let status = cmd
            .current_dir(root.join("plugins/examples"))
            .env("RUSTC", "/usr/bin/rustc")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", linker)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-unknown-unknown",
                "-Zbuild-std=std,panic_abort",
            ])
            .status()
            .expect("run Debian's cargo");
        assert!(status.success(), "building plugins/examples failed");
        target_dir.join("wasm32-unknown-unknown/release")
    })
}

fn wasm(name: &str) -> PathBuf {
    built().join(format!("{name}.wasm"))
}

fn host() -> &'static PluginHost {
    static HOST: OnceLock<PluginHost> = OnceLock::new();
    HOST.get_or_init(|| PluginHost::new(None))
}

fn load(name: &str, options: PluginOptions) -> Plugin {
    host()
        .load(&wasm(name), options)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn node(plugin: &Plugin, name: &str) -> Arc<PluginNode> {
    let full = format!("{}/{name}", plugin.id);
    plugin
        .nodes
        .iter()
        .find(|n| n.spec().name == full)
        .unwrap_or_else(|| panic!("no node {full}"))
        .clone()
}

fn run(
    node: &Arc<PluginNode>,
    pairs: Vec<(&'static str, Value)>,
) -> Result<Vec<(String, Value)>, NodeError> {
    let inputs = Inputs::from_pairs(node.clone(), pairs)?;
    let ctx = NodeContext::detached(ROOT, std::env::temp_dir());
    node.run(&ctx, inputs).map(|o| o.0)
}

fn tensor(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

// ---- loading and listing ---------------------------------------------------------

#[test]
fn examples_load_and_declare_their_nodes() {
    let starter = load("starter", PluginOptions::default());
    assert_eq!(starter.id, "starter");
    assert_eq!(starter.interface.to_string(), "0.1.0");
    let mut names: Vec<_> = starter.nodes.iter().map(|n| n.spec().id()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "starter/image.adjust@1",
            "starter/latents.blend@1",
            "starter/prompt.template@1"
        ]
    );
    let adjust = node(&starter, "image.adjust");
    let spec = adjust.spec();
    assert_eq!(spec.category, "image");
    let contrast = &spec.inputs[spec.input_index("contrast").unwrap()];
    assert_eq!(contrast.default, Some(serde_json::json!(1.0)));
    assert_eq!((contrast.min, contrast.max), (Some(0.0), Some(4.0)));
    let blend = node(&starter, "latents.blend");
    let mode = &blend.spec().inputs[3];
    assert_eq!(mode.ty.to_string(), "Enum[linear|slerp]");

    // Registered next to the built-ins, they are in the same catalog.
    let mut registry = pixart_nodes::builtin_registry();
    let before = registry.len();
    starter.register(&mut registry).unwrap();
    assert_eq!(registry.len(), before + 3);
    assert!(registry.lookup("starter/prompt.template").is_ok());
    // Twice is a clash that names the plugin.
    let again = starter.register(&mut registry).unwrap_err().to_string();
    assert!(
        again.contains("plugin `starter`") && again.contains("registered twice"),
        "{again}"
    );
}

#[test]
fn the_cli_lists_a_plugins_folder() {
    let out = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .args(["nodes", "--json", "--plugins"])
        .arg(built())
        .output()
        .unwrap();
    assert!(out.status.success());
    let catalog: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = catalog
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for name in ["starter/image.adjust", "testkit/bench.noop", "vae.decode"] {
        assert!(names.contains(&name), "{name} missing");
    }
}

#[test]
fn compiled_plugins_are_cached_on_disk_and_a_damaged_cache_is_rebuilt() {
    let cache = tempfile::tempdir().unwrap();
    let first = PluginHost::new(Some(cache.path().to_path_buf()));
    first
        .load(&wasm("starter"), PluginOptions::default())
        .unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let hash = blake3::hash(&std::fs::read(wasm("starter")).unwrap()).to_hex();
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(hash.as_str()));

    // A new host (a new process) loads the artefact instead of compiling.
    let second = PluginHost::new(Some(cache.path().to_path_buf()));
    let t = Instant::now();
    let plugin = second
        .load(&wasm("starter"), PluginOptions::default())
        .unwrap();
    eprintln!("load from cache: {:?}", t.elapsed());
    assert_eq!(plugin.nodes.len(), 3);

    std::fs::write(&files[0], b"damaged").unwrap();
    let third = PluginHost::new(Some(cache.path().to_path_buf()));
    let plugin = third
        .load(&wasm("starter"), PluginOptions::default())
        .unwrap();
    assert_eq!(plugin.nodes.len(), 3);
    assert!(
        std::fs::metadata(&files[0]).unwrap().len() > 1000,
        "the artefact was rewritten"
    );
}

// ---- the example nodes -------------------------------------------------------------

#[test]
fn blend_adjust_and_template_compute_what_they_say() {
    let starter = load("starter", PluginOptions::default());
    let a = tensor(&[1.0, 2.0, -1.0, 0.5], &[1, 1, 2, 2]);
    let b = tensor(&[3.0, 0.0, 1.0, 0.5], &[1, 1, 2, 2]);
    let out = run(
        &node(&starter, "latents.blend"),
        vec![
            (
                "a",
                Value::Latents(Latents {
                    tensor: a,
                    image_size: Some((16, 8)),
                }),
            ),
            ("b", Value::Latents(Latents::new(b))),
            ("t", Value::Float(0.25)),
        ],
    )
    .unwrap();
    let Value::Latents(l) = &out[0].1 else {
        panic!("{out:?}")
    };
    assert_eq!(values(&l.tensor), [1.5, 1.5, -0.5, 0.5]);
    assert_eq!(l.tensor.dims(), [1, 1, 2, 2]);
    assert_eq!(l.image_size, Some((16, 8)));

    // Saturation 0 makes gray; brightness adds.
    let image = tensor(&[0.9, 0.1, 0.2, 0.0, 0.5, 1.0], &[1, 1, 2, 3]);
    let out = run(
        &node(&starter, "image.adjust"),
        vec![
            ("image", Value::Image(image)),
            ("saturation", Value::Float(0.0)),
            ("brightness", Value::Float(0.1)),
        ],
    )
    .unwrap();
    let Value::Image(img) = &out[0].1 else {
        panic!()
    };
    let px = values(img);
    let luma = 0.2126 * 0.9 + 0.7152 * 0.1 + 0.0722 * 0.2 + 0.1;
    for c in &px[..3] {
        assert!((c - luma).abs() < 1e-6, "{px:?}");
    }

    let template = node(&starter, "prompt.template");
    let fill = Value::List(vec![Value::String("shape=circle".into())]);
    let text = |seed: i64| {
        let out = run(
            &template,
            vec![
                (
                    "template",
                    Value::String("a {red|green|blue} {shape} {{1}}".into()),
                ),
                ("fill", fill.clone()),
                ("seed", Value::Int(seed)),
            ],
        )
        .unwrap();
        match &out[0].1 {
            Value::String(s) => s.clone(),
            v => panic!("{v:?}"),
        }
    };
    let t3 = text(3);
    assert_eq!(t3, text(3), "a seed gives one prompt");
    assert!(
        [
            "a red circle {1}",
            "a green circle {1}",
            "a blue circle {1}"
        ]
        .contains(&t3.as_str()),
        "{t3}"
    );
    let colours: std::collections::HashSet<String> = (0..30).map(text).collect();
    assert_eq!(colours.len(), 3, "every alternative comes up");

    let err = run(
        &template,
        vec![("template", Value::String("a {size} dog".into()))],
    )
    .unwrap_err();
    assert!(
        matches!(&err, NodeError::Input { port, .. } if port == "fill"),
        "{err}"
    );
    assert!(err.to_string().contains("no value for `{size}`"), "{err}");
}

/// A workflow file mixing built-in and plugin nodes, run by `pixart run`: the
/// plugin comes from the workflow's `plugins:` section; tensors go built-in →
/// plugin → built-in → plugin → built-in.
#[test]
fn a_workflow_mixes_builtin_and_plugin_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = dir.path().join("mixed.yaml");
    std::fs::write(
        &workflow,
        format!(
            r#"version: 1
plugins:
  - {starter}
nodes:
  vae: {{type: vae.load, inputs: {{path: models/pixart-shapes/vae}}}}
  noise_a: {{type: noise.gaussian, inputs: {{shape: [1, 64, 64, 3], seed: 1}}}}
  noise_b: {{type: noise.gaussian, inputs: {{shape: [1, 64, 64, 3], seed: 2}}}}
  img_a: {{type: image.from_tensor, inputs: {{tensor: "${{noise_a.tensor}}", layout: nhwc}}}}
  img_b: {{type: image.from_tensor, inputs: {{tensor: "${{noise_b.tensor}}", layout: nhwc}}}}
  enc_a: {{type: vae.encode, inputs: {{vae: "${{vae.vae}}", image: "${{img_a.image}}", mode: mean}}}}
  enc_b: {{type: vae.encode, inputs: {{vae: "${{vae.vae}}", image: "${{img_b.image}}", mode: mean}}}}
  blend: {{type: starter/latents.blend, inputs: {{a: "${{enc_a.latents}}", b: "${{enc_b.latents}}", t: 0.3, mode: slerp}}}}
  decode: {{type: vae.decode, inputs: {{vae: "${{vae.vae}}", latents: "${{blend.latents}}"}}}}
  gray: {{type: starter/image.adjust, inputs: {{image: "${{decode.image}}", saturation: 0}}}}
  prompt: {{type: starter/prompt.template, inputs: {{template: "a {{red|blue}} {{shape}}", fill: [shape=square]}}}}
  save: {{type: image.save, inputs: {{image: "${{gray.image}}", path: gray.png}}}}
  note: {{type: text.save, inputs: {{text: "${{prompt.text}}", path: prompt.txt}}}}
"#,
            starter = wasm("starter").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pixart"))
        .current_dir(ROOT)
        .arg("run")
        .arg(&workflow)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prompt = std::fs::read_to_string(dir.path().join("prompt.txt")).unwrap();
    assert!(
        prompt == "a red square" || prompt == "a blue square",
        "{prompt}"
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(dir.path().join("gray.png")).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.width, info.height, info.color_type),
        (64, 64, png::ColorType::Rgb)
    );
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(3).collect();
    let colourful = pixels
        .iter()
        .filter(|p| p[0].abs_diff(p[1]) > 1 || p[1].abs_diff(p[2]) > 1)
        .count();
    assert_eq!(
        colourful, 0,
        "the plugin's grayscale reached the saved file"
    );
    let distinct: std::collections::HashSet<u8> = pixels.iter().map(|p| p[0]).collect();
    assert!(distinct.len() > 10, "a decoded picture, not a constant");
}

/// The same mix through the library: the plugin's output tensor is the one a
/// built-in node receives, and the numbers agree with a direct computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_tensors_flow_into_builtin_nodes_and_back() {
    let starter = load("starter", PluginOptions::default());
    let mut registry = pixart_nodes::builtin_registry();
    starter.register(&mut registry).unwrap();
    let yaml = r#"version: 1
nodes:
  a: {type: noise.gaussian, inputs: {shape: [1, 3, 8, 8], seed: 1}}
  b: {type: noise.gaussian, inputs: {shape: [1, 3, 8, 8], seed: 2}}
  la: {type: image.from_tensor, inputs: {tensor: "${a.tensor}", range: zero_one}}
  gray: {type: starter/image.adjust, inputs: {image: "${la.image}", contrast: 0.5}}
  back: {type: image.to_tensor, inputs: {image: "${gray.image}", range: zero_one}}
  again: {type: starter/image.adjust, inputs: {image: "${la.image}", contrast: 0.5}}
"#;
    let wf = load_workflow(yaml, &registry, &LoadOptions::default()).unwrap();
    let report = Executor::new(CachePolicy::None)
        .run(
            &wf,
            RunOptions {
                targets: vec!["back".into(), "again".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.failures);
    let Some(Value::Tensor(back)) = report.output("back", "tensor") else {
        panic!()
    };
    let Some(Value::Image(la)) = report.output("la", "image") else {
        panic!()
    };
    let expect: Vec<f32> = values(la)
        .iter()
        .map(|v| ((v - 0.5) * 0.5 + 0.5).clamp(0.0, 1.0))
        .collect();
    let got = values(&back.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap());
    assert_eq!(got.len(), expect.len());
    for (g, e) in got.iter().zip(&expect) {
        assert!((g - e).abs() < 1e-6);
    }
}

// ---- hostile plugins ---------------------------------------------------------------

fn testkit(limits: Limits, read_dir: Option<PathBuf>) -> Plugin {
    load("testkit", PluginOptions { limits, read_dir })
}

fn quick_limits() -> Limits {
    Limits {
        timeout: Duration::from_millis(500),
        memory_bytes: 64 << 20,
        output_bytes: 64 << 20,
    }
}

/// Runs a hostile node, returns its error, and shows that the next call on
/// the same plugin works.
fn hostile(plugin: &Plugin, name: &str, pairs: Vec<(&'static str, Value)>) -> String {
    let err = run(&node(plugin, name), pairs).expect_err("a hostile node must fail");
    let message = err.to_string();
    assert!(
        message.contains(&format!("plugin `testkit`, node `{name}`")),
        "the error names plugin and node: {message}"
    );
    let ok = run(&node(plugin, "bench.noop"), vec![]).expect("the host still works");
    assert!(matches!(ok[0].1, Value::Int(0)));
    message
}

#[test]
fn an_endless_loop_hits_the_time_limit() {
    let plugin = testkit(quick_limits(), None);
    let t = Instant::now();
    let message = hostile(&plugin, "hostile.spin", vec![]);
    assert!(
        message.contains("ran longer than its time limit of 0.5 s"),
        "{message}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let message = hostile(&testkit(quick_limits(), None), "hostile.hog", vec![]);
    assert!(
        message.contains("more memory than its limit of 64 MiB"),
        "{message}"
    );
}

#[test]
fn a_panic_is_reported_with_its_message() {
    let message = hostile(&testkit(quick_limits(), None), "hostile.panic", vec![]);
    assert!(
        message.contains("panicked") && message.contains("the testkit panics on purpose"),
        "{message}"
    );
}

#[test]
fn a_wrong_output_type_is_refused() {
    let message = hostile(&testkit(quick_limits(), None), "hostile.wrong_type", vec![]);
    assert!(
        message.contains("output `out` should be Image, the plugin returned Int"),
        "{message}"
    );
}

#[test]
fn a_huge_output_hits_the_output_limit() {
    let limits = Limits {
        memory_bytes: 256 << 20,
        ..quick_limits()
    };
    let message = hostile(&testkit(limits, None), "hostile.huge", vec![]);
    assert!(
        message.contains("made more output than its limit of 64 MiB"),
        "{message}"
    );
}

#[test]
fn files_are_out_of_reach_without_a_grant_and_read_only_inside_one() {
    let message = hostile(&testkit(quick_limits(), None), "hostile.read", vec![]);
    assert!(message.contains("has no file access"), "{message}");

    let granted = tempfile::tempdir().unwrap();
    std::fs::write(granted.path().join("secret.txt"), "12345").unwrap();
    let plugin = testkit(quick_limits(), Some(granted.path().to_path_buf()));
    let message = hostile(&plugin, "hostile.read", vec![]);
    assert!(
        message.contains("read 5 bytes"),
        "the grant works: {message}"
    );
    for escape in ["../secret.txt", "/etc/passwd", "a/../../x"] {
        let message = hostile(
            &plugin,
            "hostile.read",
            vec![("path", Value::String(escape.into()))],
        );
        assert!(
            message.contains("only relative paths inside the granted folder"),
            "{escape}: {message}"
        );
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/etc", granted.path().join("out")).unwrap();
        let message = hostile(
            &plugin,
            "hostile.read",
            vec![("path", Value::String("out/hostname".into()))],
        );
        assert!(
            message.contains("leads outside the granted folder"),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_stops_a_spinning_plugin() {
    let plugin = testkit(
        Limits {
            timeout: Duration::from_secs(60),
            ..quick_limits()
        },
        None,
    );
    let mut registry = pixart_nodes::builtin_registry();
    plugin.register(&mut registry).unwrap();
    let wf = load_workflow(
        "version: 1\nnodes:\n  spin: {type: testkit/hostile.spin}\n",
        &registry,
        &LoadOptions::default(),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let later = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        later.cancel();
    });
    let t = Instant::now();
    let report = Executor::new(CachePolicy::None)
        .run(
            &wf,
            RunOptions {
                targets: vec!["spin".into()],
                cancel,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(report.cancelled);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

// ---- components that are refused at load -------------------------------------------

fn load_wat(name: &str, text: &str) -> String {
    let bytes = wat::parse_str(text).unwrap();
    match host().load_bytes(Path::new(name), &bytes, PluginOptions::default()) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    }
}

/// A component exporting `export` (an empty instance) and importing `imports`.
fn component(export: &str, imports: &[&str]) -> String {
    let imports: String = imports
        .iter()
        .map(|i| format!("  (import \"{i}\" (instance))\n"))
        .collect();
    format!("(component\n{imports}  (instance $e)\n  (export \"{export}\" (instance $e))\n)")
}

#[test]
fn an_unknown_interface_version_is_refused_naming_both_versions() {
    let message = load_wat("future.wasm", &component("pixart:plugin/plugin@0.9.0", &[]));
    assert!(
        message.contains("future.wasm")
            && message.contains(
                "built for interface pixart:plugin@0.9.0; this host supports pixart:plugin@0.1.x"
            ),
        "{message}"
    );
}

#[test]
fn wasi_imports_are_refused_without_running_anything() {
    for import in [
        "wasi:filesystem/preopens@0.2.0",
        "wasi:sockets/tcp-create-socket@0.2.0",
        "wasi:cli/environment@0.2.0",
    ] {
        let message = load_wat(
            "sneaky.wasm",
            &component("pixart:plugin/plugin@0.1.0", &[import]),
        );
        assert!(
            message.contains(&format!(
                "imports `{import}`: plugins get no filesystem, network"
            )),
            "{message}"
        );
    }
    // The host that refused them loads the next plugin as usual.
    assert_eq!(load("starter", PluginOptions::default()).nodes.len(), 3);
}

#[test]
fn a_workflow_naming_a_bad_plugin_fails_validation_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    // `pixart validate` on a workflow whose second plugin entry is `second`.
    let validate = |second: String| {
        let workflow = dir.path().join("bad.yaml");
        std::fs::write(
            &workflow,
            format!(
                "version: 1\nplugins:\n  - {}\n  - {second}\nnodes:\n  x: {{type: starter/prompt.template, inputs: {{template: hi}}}}\n",
                junk.display(),
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_pixart"))
            .arg("validate")
            .arg(&workflow)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let starter = wasm("starter").display().to_string();
    let text = validate(format!("{{path: {starter}, memory_mb: 0}}"));
    assert!(
        text.contains("bad.yaml:4:") && text.contains("`memory_mb` is a positive number"),
        "{text}"
    );
    let text = validate(starter);
    assert!(
        text.contains("bad.yaml:3:") && text.contains("junk.wasm: is not a WebAssembly component"),
        "{text}"
    );
    assert!(!text.contains(":4:"), "the good plugin loads: {text}");
}

#[test]
fn not_a_plugin_is_refused_clearly() {
    let message = load_wat("other.wasm", &component("example:thing/api@1.0.0", &[]));
    assert!(message.contains("not a pixart-flow plugin"), "{message}");
    let message = load_wat("core.wasm", "(module)");
    assert!(
        message.contains("core WebAssembly module, not a component"),
        "{message}"
    );
    let message = host()
        .load_bytes(Path::new("junk.wasm"), b"hello", PluginOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("not a WebAssembly component"), "{message}");
}

/// Bandwidth and call overhead (reported by `pixart bench plugins` in release;
/// here only that the echo is exact).
#[test]
fn echo_returns_the_tensor_exactly() {
    let plugin = testkit(Limits::default(), None);
    let data: Vec<f32> = (0..1 << 20).map(|i| i as f32 * 0.5).collect();
    let out = run(
        &node(&plugin, "bench.echo"),
        vec![("tensor", Value::Tensor(tensor(&data, &[1024, 1024])))],
    )
    .unwrap();
    let Value::Tensor(t) = &out[0].1 else {
        panic!()
    };
    assert_eq!(t.dims(), [1024, 1024]);
    assert_eq!(values(t), data);
}
