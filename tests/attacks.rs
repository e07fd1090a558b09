//! `pixart serve` attacked as a hostile client would: each test is one finding of
//! issue 20 with its variations (other nodes, other spellings, links to links,
//! hard links). After every attack the server still answers, nothing outside its
//! folders was read or written, and nothing earlier in `--out` was lost.

mod common;

use common::api::{call, wait_done};
use pixart_runtime::executor::{CachePolicy, Executor};
use pixart_runtime::server::{ServerConfig, State};
use serde_json::Value as J;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use warp::http::StatusCode;

/// A server as `pixart serve --out out` started in `base`, with the test
/// fixtures copied into `base/fixtures`, and a folder outside both.
struct Site {
    _root: tempfile::TempDir,
    base: PathBuf,
    out: PathBuf,
    outside: PathBuf,
    server: Arc<State>,
}

fn site() -> Site {
    site_config(|_| {})
}

fn site_with(run_memory_limit: u64) -> Site {
    site_config(|c| c.run_memory_limit = run_memory_limit)
}

/// A site whose server settings `tune` changes.
fn site_config(tune: impl FnOnce(&mut ServerConfig)) -> Site {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let out = base.join("out");
    let outside = root.path().join("outside");
    for d in [&out, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for model in ["tiny-pixart", "tiny-llava"] {
        copy_dir(&fixtures.join(model), &base.join("fixtures").join(model));
    }
    std::fs::write(outside.join("secret.txt"), "secret").unwrap();
    png_file(&outside.join("secret.png"));
    let (reg, _) = common::registry();
    let mut config = ServerConfig {
        out_dir: out.clone(),
        base_dir: base.clone(),
        run_memory_limit: 2 << 30,
        ..ServerConfig::default()
    };
    tune(&mut config);
    let server = State::start(reg, Executor::new(CachePolicy::default()), config);
    Site {
        _root: root,
        base,
        out,
        outside,
        server,
    }
}

impl Site {
    /// Submits a workflow and waits for its end.
    async fn run(&self, yaml: &str) -> J {
        let (status, queued, _) = call(&self.server, "POST", "/api/runs", yaml).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
        wait_done(&self.server, queued["run_id"].as_str().unwrap()).await
    }

    /// Submits a workflow that must fail, and returns why.
    async fn refused(&self, yaml: &str) -> String {
        let run = self.run(yaml).await;
        assert_eq!(run["state"], "failed", "{yaml}\n{run}");
        self.still_up().await;
        run["failures"].to_string()
    }

    async fn still_up(&self) {
        let (status, _, _) = call(&self.server, "GET", "/api/nodes", "").await;
        assert_eq!(status, StatusCode::OK);
    }

    /// Everything below `dir`, as sorted relative paths.
    fn listing(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                found.push(p.strip_prefix(dir).unwrap().display().to_string());
                if p.is_dir() && !p.is_symlink() {
                    pending.push(p);
                }
            }
        }
        found.sort();
        found
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn png_file(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 16, 16);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let pixels: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 7 % 251) as u8).collect();
    enc.write_header()
        .unwrap()
        .write_image_data(&pixels)
        .unwrap();
}

fn text_save(path: &str) -> String {
    format!(
        "version: 1\nnodes:\n  t: {{type: text.save, inputs: {{text: pwned, path: \"{path}\"}}}}\n"
    )
}

fn image_load(path: &str) -> String {
    format!(
        "version: 1\nnodes:\n  l: {{type: image.load, inputs: {{path: \"{path}\"}}}}\n  \
         s: {{type: image.save, inputs: {{image: \"${{l.image}}\", path: copy.png}}}}\n"
    )
}

// ---- 1: a folder output replaced the whole output folder -----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_folder_never_replaces_the_output_folder_or_a_folder_of_other_files() {
    let site = site();
    assert_eq!(
        site.run(&text_save("earlier/a.txt")).await["state"],
        "finished"
    );
    assert_eq!(site.run(&text_save("keep.txt")).await["state"], "finished");
    // Everything but the server's own data, which each run updates.
    let files = || {
        let mut all = Site::listing(site.base.parent().unwrap());
        all.retain(|f| !f.starts_with("base/out/.pixart/"));
        all
    };
    let before = files();
    let t5_init = |out: &str| {
        format!(
            "version: 1\nnodes:\n  load: {{type: pixart.load, inputs: {{path: fixtures/tiny-pixart}}}}\n  \
             t5: {{type: t5.init, inputs: {{tokenizer: \"${{load.tokenizer}}\", d_model: 16, d_kv: 8, \
             d_ff: 32, heads: 2, out: \"{out}\"}}}}\n"
        )
    };
    let out_abs = site.out.display().to_string();
    for target in [
        out_abs.clone(),
        format!("{out_abs}/"),
        format!("{out_abs}/."),
        ".".into(),
        "./".into(),
        "earlier".into(),
        "earlier/.".into(),
    ] {
        let why = site.refused(&t5_init(&target)).await;
        assert!(
            why.contains("output folder itself") || why.contains("holds files"),
            "{target}: {why}"
        );
        assert_eq!(
            std::fs::read_to_string(site.out.join("keep.txt")).unwrap(),
            "pwned"
        );
        assert!(site.out.join("earlier/a.txt").is_file(), "{target}");
        assert_eq!(files(), before, "{target}");
    }
    // A new folder is written, and written again over itself.
    for _ in 0..2 {
        let run = site.run(&t5_init("models/text_encoder")).await;
        assert_eq!(run["state"], "finished", "{run}");
    }
    assert!(site.out.join("models/text_encoder/config.json").is_file());
}

// ---- 2: one long chain overflowed a worker's stack -----------------------------

fn chain(n: usize) -> String {
    let mut yaml =
        String::from("version: 1\nnodes:\n  n0: {type: math.int, inputs: {a: 1, b: 1}}\n");
    for i in 1..n {
        yaml.push_str(&format!(
            "  n{i}: {{type: math.int, inputs: {{a: \"${{n{}.result}}\", b: 1}}}}\n",
            i - 1
        ));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_many_nodes_is_validated_without_deep_recursion() {
    let site = site();
    let (status, body, _) = call(&site.server, "POST", "/api/validate", chain(25_000)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ok"], true, "{}", body["diagnostics"]);
    site.still_up().await;
    // Nesting in YAML itself: block sequences have no depth limit in the parser.
    let deep = format!("{}x\n", "- ".repeat(100_000));
    let (status, body, _) = call(&site.server, "POST", "/api/validate", deep).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.to_string().contains("nested more than"), "{body}");
    site.still_up().await;
    // The CLI loads on a thread of its own; a 2 MiB stack is the smallest in use.
    let (reg, _) = common::registry();
    let long = chain(100_000);
    let loaded = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || common::load(&long, &reg).nodes.len())
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(loaded, 100_000);
}

// ---- 3: manifests named images anywhere -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_entries_are_confined_like_the_paths_a_workflow_names() {
    let site = site();
    let data = site.out.join("data");
    std::fs::create_dir_all(&data).unwrap();
    png_file(&data.join("ok.png"));
    std::os::unix::fs::symlink(site.outside.join("secret.png"), data.join("link.png")).unwrap();
    std::os::unix::fs::symlink(data.join("link.png"), data.join("link2.png")).unwrap();
    let hard = std::fs::hard_link(site.outside.join("secret.png"), data.join("hard.png")).is_ok();
    let secret = site.outside.join("secret.png").display().to_string();
    let mut entries = vec![
        secret.clone(),
        "/etc/passwd".into(),
        "../../outside/secret.png".into(),
        "link.png".into(),
        "link2.png".into(),
    ];
    if hard {
        entries.push("hard.png".into());
    }
    for (i, image) in entries.iter().enumerate() {
        let manifest = data.join(format!("m{i}.jsonl"));
        std::fs::write(
            &manifest,
            format!("{}\n", serde_json::json!({"image": image, "caption": "x"})),
        )
        .unwrap();
        let yaml = format!(
            "version: 1\nnodes:\n  d: {{type: dataset.folder, inputs: {{path: out/data/m{i}.jsonl, resolution: 64}}}}\n  \
             t: {{type: text.save, inputs: {{text: \"n=${{d.count}}\", path: count.txt}}}}\n"
        );
        let why = site.refused(&yaml).await;
        assert!(why.contains(&format!("m{i}.jsonl:1")), "{image}: {why}");
    }
    std::fs::write(
        data.join("good.jsonl"),
        format!(
            "{}\n",
            serde_json::json!({"image": "ok.png", "caption": "fine"})
        ),
    )
    .unwrap();
    let good = "version: 1\nnodes:\n  d: {type: dataset.folder, inputs: {path: out/data/good.jsonl, resolution: 64}}\n  \
                t: {type: text.save, inputs: {text: \"n=${d.count}\", path: count.txt}}\n";
    assert_eq!(site.run(good).await["state"], "finished");
}

/// Files that name other files: a sharded checkpoint's index may only name
/// shards beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_index_cannot_name_files_elsewhere() {
    let site = site();
    let secret = site.outside.join("secret.safetensors");
    std::fs::copy(
        site.base
            .join("fixtures/tiny-pixart/text_encoder/model-00001-of-00002.safetensors"),
        &secret,
    )
    .unwrap_or_else(|_| {
        let any = std::fs::read_dir(site.base.join("fixtures/tiny-pixart/text_encoder"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .unwrap();
        std::fs::copy(any.path(), &secret).unwrap()
    });
    let m = site.out.join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(
        site.base
            .join("fixtures/tiny-pixart/text_encoder/config.json"),
        m.join("config.json"),
    )
    .unwrap();
    for shard in [
        secret.display().to_string(),
        "../../../outside/secret.safetensors".into(),
    ] {
        let index = serde_json::json!({"weight_map": {"shared.weight": shard}});
        std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let yaml = "version: 1\nnodes:\n  t: {type: t5.load, inputs: {path: out/m, tokenizer: fixtures/tiny-pixart/tokenizer}}\n  \
                    e: {type: t5.encode, inputs: {tokenizer: \"${t.tokenizer}\", encoder: \"${t.text_encoder}\", text: hi}}\n  \
                    s: {type: tensor.save, inputs: {tensor: \"${e.conditioning}\", path: c.safetensors}}\n";
        let why = site.refused(yaml).await;
        assert!(
            why.contains("not a file name beside the index"),
            "{shard}: {why}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_files_are_not_inputs() {
    let site = site();
    std::fs::write(site.base.join(".env"), "TOKEN=secret").unwrap();
    assert_eq!(site.run(&text_save("a.txt")).await["state"], "finished");
    for path in [".env", "out/.pixart/history.jsonl", "./.env"] {
        let yaml = format!(
            "version: 1\nnodes:\n  d: {{type: dataset.folder, inputs: {{path: \"{path}\", resolution: 64}}}}\n  \
             t: {{type: text.save, inputs: {{text: \"n=${{d.count}}\", path: count.txt}}}}\n"
        );
        let why = site.refused(&yaml).await;
        assert!(why.contains("hidden"), "{path}: {why}");
    }
}

// ---- 4: dataset.caption rewrote caption files in folders it only read ------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_are_only_rewritten_inside_the_output_folder() {
    let site = site();
    let folders = [
        site.base.join("photos"),
        site.out.join(".pixart/uploads"),
        site.outside.join("photos"),
    ];
    for dir in &folders {
        std::fs::create_dir_all(dir).unwrap();
        png_file(&dir.join("a.png"));
        std::fs::write(dir.join("a.txt"), "mine").unwrap();
    }
    std::os::unix::fs::symlink(&folders[2], site.out.join("linked")).unwrap();
    let given = [
        "photos".to_string(),
        folders[1].display().to_string(),
        "out/linked".into(),
        folders[2].display().to_string(),
    ];
    for path in &given {
        let yaml = format!(
            "version: 1\nnodes:\n  cap: {{type: captioner.load, inputs: {{path: fixtures/tiny-llava}}}}\n  \
             relabel: {{type: dataset.caption, inputs: {{captioner: \"${{cap.captioner}}\", path: \"{path}\", max_tokens: 2}}}}\n"
        );
        let why = site.refused(&yaml).await;
        assert!(
            why.contains("relabel") && (why.contains("output folder") || why.contains("hidden")),
            "{path}: {why}"
        );
        for dir in &folders {
            assert_eq!(
                std::fs::read_to_string(dir.join("a.txt")).unwrap(),
                "mine",
                "{path}"
            );
            assert!(!dir.join("a.orig.txt").exists(), "{path}");
        }
    }
}

// ---- 5: links led reads, writes and downloads out of the folders -----------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_are_judged_by_where_they_lead() {
    use std::os::unix::fs::symlink;
    let site = site();
    let (out, outside) = (&site.out, &site.outside);
    assert_eq!(site.run(&text_save("warm.txt")).await["state"], "finished");
    let history = std::fs::read(out.join(".pixart/history.jsonl")).unwrap();
    symlink(outside.join("secret.png"), out.join("pic.png")).unwrap();
    symlink(out.join("pic.png"), out.join("pic2.png")).unwrap();
    symlink(outside, out.join("away")).unwrap();
    symlink(outside.join("secret.txt"), out.join("note.txt")).unwrap();
    symlink(outside.join("new.txt"), out.join("dangling.txt")).unwrap();
    symlink(out.join(".pixart"), out.join("data")).unwrap();
    let hard = std::fs::hard_link(outside.join("secret.png"), out.join("hard.png")).is_ok();

    let mut reads = vec!["out/pic.png", "out/pic2.png", "out/away/secret.png"];
    if hard {
        reads.push("out/hard.png");
    }
    for path in reads {
        let why = site.refused(&image_load(path)).await;
        assert!(
            why.contains("server's folders") || why.contains("hard links"),
            "{path}: {why}"
        );
    }
    for path in [
        "note.txt",
        "away/new.txt",
        "dangling.txt",
        "data/history.jsonl",
    ] {
        site.refused(&text_save(path)).await;
    }
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        "secret"
    );
    assert!(!outside.join("new.txt").exists());
    assert_eq!(Site::listing(outside), ["secret.png", "secret.txt"]);

    // A file served by id is judged again when it is fetched.
    let run = site.run(&text_save("served.txt")).await;
    let id = run["outputs"][0]["files"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("/api/files/{id}");
    assert_eq!(call(&site.server, "GET", &url, "").await.0, StatusCode::OK);
    std::fs::remove_file(out.join("served.txt")).unwrap();
    symlink(outside.join("secret.txt"), out.join("served.txt")).unwrap();
    let (status, _, body) = call(&site.server, "GET", &url, "").await;
    assert_eq!(
        status,
        StatusCode::GONE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    if hard {
        std::fs::remove_file(out.join("served.txt")).unwrap();
        std::fs::hard_link(outside.join("secret.txt"), out.join("served.txt")).unwrap();
        assert_eq!(
            call(&site.server, "GET", &url, "").await.0,
            StatusCode::GONE
        );
    }
    // The history the server keeps was not rewritten by a workflow: it only grew.
    let kept = std::fs::read(out.join(".pixart/history.jsonl")).unwrap();
    assert!(kept.len() >= history.len());
    assert!(String::from_utf8_lossy(&kept).contains("served.txt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_so_that_a_browser_cannot_run_them() {
    let site = site();
    let yaml = "version: 1\nnodes:\n  t: {type: text.save, inputs: {text: \"<script>fetch('/api/runs')</script>\", path: page.html}}\n";
    let run = site.run(yaml).await;
    let id = run["outputs"][0]["files"][0]["id"].as_str().unwrap();
    let res = warp::test::request()
        .method("GET")
        .path(&format!("/api/files/{id}"))
        .header("host", "127.0.0.1:8188")
        .reply(&pixart_runtime::server::routes(site.server.clone()))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let header = |name: &str| res.headers()[name].to_str().unwrap().to_string();
    assert_eq!(header("content-type"), "application/octet-stream");
    assert_eq!(header("content-disposition"), "attachment");
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert!(header("content-security-policy").contains("sandbox"));
}

// ---- 6: memory: a queue bounded in bytes, a history appended and bounded ---------

const SLOW: &str = "version: 1\nnodes:\n  w: {type: test.until_cancelled}\n  o: {type: test.output, inputs: {a: \"${w.out}\"}}\n";

async fn submit(site: &Site, yaml: &str) -> (StatusCode, J) {
    let (status, body, _) = call(&site.server, "POST", "/api/runs", yaml).await;
    (status, body)
}

async fn wait_running(site: &Site, id: &str) {
    for _ in 0..500 {
        let (_, r, _) = call(&site.server, "GET", &format!("/api/runs/{id}"), "").await;
        if r["state"] == "running" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("run {id} never started");
}

fn noises(shape: &str) -> String {
    let mut yaml =
        String::from("version: 1\nnodes:\n  n: {type: math.int, inputs: {a: 8, b: 1}}\n");
    for i in 0..4 {
        yaml.push_str(&format!(
            "  g{i}: {{type: noise.gaussian, inputs: {{shape: {shape}, seed: {i}}}}}\n  \
             s{i}: {{type: tensor.save, inputs: {{tensor: \"${{g{i}.tensor}}\", path: n{i}.safetensors}}}}\n"
        ));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_held_to_a_memory_budget_at_validation_and_while_it_runs() {
    // The finding: four noise nodes at the per-node cap (1 GiB each) from a
    // 300-byte request. Their sizes are known at load: refused before queueing.
    let site = site();
    let attack = noises("[16384, 16384]");
    let (status, body, _) = call(&site.server, "POST", "/api/runs", &attack).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let said = body.to_string();
    assert!(
        said.contains("resources") && said.contains("4.0 GiB"),
        "{said}"
    );
    let (_, body, _) = call(&site.server, "POST", "/api/validate", &attack).await;
    assert_eq!(body["ok"], false, "{body}");
    // A node that allocates inside itself: a T5 of 128 layers, 16384 wide.
    let huge_t5 = "version: 1\nnodes:\n  load: {type: pixart.load, inputs: {path: fixtures/tiny-pixart}}\n  \
                   t5: {type: t5.init, inputs: {tokenizer: \"${load.tokenizer}\", d_model: 16384, d_kv: 1024, d_ff: 65536, layers: 128, heads: 16, out: big}}\n";
    let (status, body, _) = call(&site.server, "POST", "/api/runs", huge_t5).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("resources"), "{body}");
    site.still_up().await;
    // Sizes that only the files tell are held to it while the run goes: four
    // tensors of 4 MiB against a budget of 10 MiB.
    let site = site_with(10 << 20);
    let mut yaml = String::from("version: 1\nnodes:\n");
    for i in 0..4 {
        let data = vec![0u8; 4 << 20];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1 << 20], &data)
                .unwrap();
        let bytes = safetensors::serialize([("t", view)], None).unwrap();
        std::fs::write(site.out.join(format!("t{i}.safetensors")), bytes).unwrap();
        yaml.push_str(&format!(
            "  l{i}: {{type: tensor.load, inputs: {{path: out/t{i}.safetensors}}}}\n  \
             s{i}: {{type: tensor.save, inputs: {{tensor: \"${{l{i}.tensor}}\", path: c{i}.safetensors}}}}\n"
        ));
    }
    let run = site.run(&yaml).await;
    assert_eq!(run["state"], "failed", "{run}");
    let said = run["failures"].to_string();
    assert!(said.contains("a run may hold here"), "{said}");
    site.still_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_in_bytes_and_a_cancel_returns_them() {
    let site = site();
    let (_, blocker) = submit(&site, SLOW).await;
    let blocker = blocker["run_id"].as_str().unwrap().to_string();
    // 3.5 MB workflows, as in the finding: the 32 MiB queue takes nine.
    let big = format!(
        "version: 1\nnodes:\n  t: {{type: text.save, inputs: {{text: \"{}\", path: big.txt}}}}\n",
        "x".repeat(3_500_000)
    );
    let mut queued = Vec::new();
    loop {
        let (status, body) = submit(&site, &big).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(body["error"].to_string().contains("MiB"), "{body}");
            break;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        queued.push(body["run_id"].as_str().unwrap().to_string());
        assert!(
            queued.len() < 20,
            "the queue took {} big workflows",
            queued.len()
        );
    }
    assert_eq!(queued.len(), 9);
    site.still_up().await;
    let (status, _, _) = call(
        &site.server,
        "POST",
        &format!("/api/runs/{}/cancel", queued[0]),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(submit(&site, &big).await.0, StatusCode::ACCEPTED);
    call(
        &site.server,
        "POST",
        &format!("/api/runs/{blocker}/cancel"),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_appended_and_a_large_run_keeps_a_bounded_record() {
    let site = site();
    let journal = site.out.join(".pixart/history.jsonl");
    let size = || std::fs::metadata(&journal).map_or(0, |m| m.len());
    assert_eq!(site.run(&text_save("a.txt")).await["state"], "finished");
    let run = site.run(&chain(20_000)).await;
    assert_eq!(run["state"], "finished");
    assert_eq!(run["node_states"].as_object().unwrap().len(), 10_000);
    let before = size();
    assert!(
        before > 0 && before < 3 << 20,
        "{before} bytes after one large run"
    );
    // Another small run appends its own lines, it does not rewrite the rest.
    assert_eq!(site.run(&text_save("b.txt")).await["state"], "finished");
    let grown = size() - before;
    assert!(grown < 4096, "{grown}");
}

// ---- 7: the smaller findings ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_cut_short_by_a_crash_are_interrupted_and_stale_temporaries_go() {
    let site = site();
    let (_, running) = submit(&site, SLOW).await;
    let running = running["run_id"].as_str().unwrap().to_string();
    let (_, waiting) = submit(&site, SLOW).await;
    let waiting = waiting["run_id"].as_str().unwrap().to_string();
    wait_running(&site, &running).await;
    // A writer killed mid-file (pid 0 is no process) left its temporary.
    let stale = site.out.join("pics/.a.png.0-7.tmp");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"half").unwrap();
    // The server dies here; a new one starts on the same folder.
    let (reg, _) = common::registry();
    let config = ServerConfig {
        out_dir: site.out.clone(),
        base_dir: site.base.clone(),
        ..ServerConfig::default()
    };
    let restarted = State::start(reg, Executor::new(CachePolicy::default()), config);
    for id in [&running, &waiting] {
        let (status, r, _) = call(&restarted, "GET", &format!("/api/runs/{id}"), "").await;
        assert_eq!(
            (status, r["state"].clone()),
            (StatusCode::OK, J::from("interrupted")),
            "{r}"
        );
    }
    assert!(!stale.exists());
    call(
        &site.server,
        "POST",
        &format!("/api/runs/{running}/cancel"),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_keep_the_servers_paths_and_backtraces_to_themselves() {
    let site = site();
    let run = site.run(&text_save("notes/a.txt")).await;
    let text = run.to_string();
    let root = site.base.parent().unwrap().canonicalize().unwrap();
    assert!(!text.contains(&root.display().to_string()), "{text}");
    assert_eq!(run["outputs"][0]["files"][0]["path"], "notes/a.txt");
    // An upload is named relative to the folder workflows read from.
    let png = std::fs::read(site.outside.join("secret.png")).unwrap();
    let (status, up, _) = call(&site.server, "POST", "/api/uploads", png).await;
    assert_eq!(status, StatusCode::CREATED, "{up}");
    let path = up["path"].as_str().unwrap();
    assert!(path.starts_with("out/.pixart/uploads/"), "{path}");
    assert_eq!(site.run(&image_load(path)).await["state"], "finished");
    // A library error that captured a backtrace reaches the client without it.
    let failing = "version: 1\nnodes:\n  f: {type: test.fail_backtrace}\n  o: {type: test.output, inputs: {a: \"${f.out}\"}}\n";
    let run = site.run(failing).await;
    assert_eq!(run["failures"][0]["message"], "failed on purpose", "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_order_mark_is_not_a_key() {
    let site = site();
    let (status, body, _) = call(
        &site.server,
        "POST",
        "/api/validate",
        format!("\u{feff}{}", text_save("a.txt")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ok"], true, "{body}");
}

/// A real socket: warp's test client sets a Content-Length and has no clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_read_with_a_limit_and_slow_headers_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = tempfile::tempdir().unwrap();
    let (reg, _) = common::registry();
    let config = ServerConfig {
        out_dir: root.path().join("out"),
        base_dir: root.path().to_path_buf(),
        upload_limit: 1 << 16,
        header_read_timeout: std::time::Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let state = State::start(reg, Executor::new(CachePolicy::default()), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pixart_runtime::server::serve(state, listener));
    let exchange = |body: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req =
            b"POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                .to_vec();
        for chunk in body.chunks(1000) {
            req.extend(format!("{:x}\r\n", chunk.len()).bytes());
            req.extend(chunk);
            req.extend(b"\r\n");
        }
        req.extend(b"0\r\n\r\n");
        s.write_all(&req).await.unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer).await;
        answer
    };
    let root_png = root.path().join("p.png");
    png_file(&root_png);
    let answer = exchange(std::fs::read(&root_png).unwrap()).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let mut big = std::fs::read(&root_png).unwrap();
    big.resize(1 << 17, 0);
    let answer = exchange(big).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Nothing at all, then half a request line: the server hangs up on both.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        silent.read_to_end(&mut rest),
    )
    .await;
    assert!(
        closed.is_ok(),
        "a silent connection was still open after 5 s"
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/nodes HTTP/1.1\r\nHost: 127")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection was still open after 5 s");
}

#[test]
fn the_cli_bounds_what_it_reads_and_names_a_missing_plugins_folder() {
    let pixart = env!("CARGO_BIN_EXE_pixart");
    let out = std::process::Command::new(pixart)
        .args(["validate", "/dev/zero"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("larger than 64 MiB"), "{said}");
    let out = std::process::Command::new(pixart)
        .args(["--plugins", "/no/such/folder", "nodes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/folder: no such folder"), "{err}");
}

// ---- the API's bodies and paths, fuzzed ---------------------------------------------

/// xorshift64*: a fixed seed keeps a failure reproducible (`PIXART_FUZZ_SEED`
/// tries others).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Pieces that have broken parsers and path checks elsewhere.
const TOKENS: &[&str] = &[
    "..",
    "/",
    "../..",
    "${",
    "}",
    "${params.x}",
    "\0",
    "\u{feff}",
    "[[[[[[[[",
    "]]]]",
    "{{{{",
    "*a",
    "&a [1]",
    "!!binary AAAA",
    "~",
    "-1",
    "1e309",
    "99999999999999999999",
    "/etc/passwd",
    ".pixart/history.jsonl",
    "%2e%2e%2f",
    "\\..\\",
    "\n  x: {type: text.save, inputs: {text: a, path: /tmp/x}}",
    "\n  y: {type: image.load, inputs: {path: ../../outside/secret.png}}",
    "'",
    "\"",
    ":",
    "- ",
    "\t",
    "\r\n",
    "\u{202e}",
    "é",
    "version: 2",
    "nodes: []",
];

/// Parts of the paths a fuzzed workflow names (the site links `out/away` and
/// `out/pic.png` outside).
const PATH_PARTS: &[&str] = &[
    "..",
    "/",
    "./",
    "out/",
    "out",
    "away/",
    "pic.png",
    "secret.png",
    ".pixart/",
    "history.jsonl",
    "a.txt",
    "sub/",
    "/etc/passwd",
    "~",
    "%2e%2e/",
    "\\",
    "..\\",
    "//",
    "fixtures/",
    "new.png",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut body = seed.to_vec();
    for _ in 0..=rng.below(2) {
        let at = rng.below(body.len() + 1);
        match rng.below(5) {
            0 if !body.is_empty() => {
                let i = rng.below(body.len());
                body[i] ^= 1 << rng.below(8);
            }
            1 => {
                let token = rng.pick(TOKENS).as_bytes();
                body.splice(at..at, token.iter().copied());
            }
            2 if at < body.len() => {
                let end = (at + rng.below(40)).min(body.len());
                body.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(60)).min(body.len());
                let copy = body[at..end].to_vec();
                body.splice(at..at, copy);
            }
            _ => body.truncate(at),
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bodies_and_paths_never_break_the_server_or_leave_its_folders() {
    use common::api::send;
    let site = site();
    let seed = std::env::var("PIXART_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let mut rng = Rng(seed | 1);
    std::os::unix::fs::symlink(&site.outside, site.out.join("away")).unwrap();
    std::os::unix::fs::symlink(site.outside.join("secret.png"), site.out.join("pic.png")).unwrap();
    let outside_before = Site::listing(&site.outside);
    let corpus: Vec<Vec<u8>> = vec![
        text_save("notes/a.txt").into_bytes(),
        image_load("out/notes/a.png").into_bytes(),
        chain(30).into_bytes(),
        serde_json::json!({"workflow": text_save("j.txt"), "params": {"x": 1}, "targets": ["t"]})
            .to_string()
            .into_bytes(),
        noises("[2, 3]").into_bytes(),
    ];
    let paths = ["/api/validate", "/api/runs", "/api/uploads"];
    let started = std::time::Instant::now();
    let mut requests = 0;
    let mut seen = std::collections::BTreeMap::new();
    while requests < 12000 && started.elapsed() < std::time::Duration::from_secs(30) {
        requests += 1;
        let (method, path, body, ctype) = match rng.below(8) {
            0..=1 => {
                // A valid workflow whose paths are pieced together from parts that
                // lead out when the checks are wrong.
                let mut p = String::new();
                for _ in 0..=rng.below(4) {
                    p.push_str(PATH_PARTS[rng.below(PATH_PARTS.len())]);
                }
                let p = p.replace('"', "");
                let yaml = match rng.below(3) {
                    0 => text_save(&p),
                    1 => image_load(&p),
                    _ => format!(
                        "version: 1\nnodes:\n  d: {{type: dataset.folder, inputs: {{path: \"{p}\", resolution: 64}}}}\n  \
                         t: {{type: text.save, inputs: {{text: \"n=${{d.count}}\", path: count.txt}}}}\n"
                    ),
                };
                (
                    "POST",
                    "/api/runs".to_string(),
                    yaml.into_bytes(),
                    "application/yaml",
                )
            }
            2..=4 => {
                let seed_body = rng.pick(&corpus).clone();
                let body = mutate(&mut rng, &seed_body);
                let ctype = if body.starts_with(b"{") {
                    "application/json"
                } else {
                    "application/yaml"
                };
                ("POST", rng.pick(&paths[..2]).to_string(), body, ctype)
            }
            5 => {
                let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
                png.extend((0..rng.below(64)).map(|_| rng.next() as u8));
                ("POST", "/api/uploads".to_string(), png, "image/png")
            }
            _ => {
                // Bytes a URI cannot hold travel percent-encoded, as a client sends them.
                let tail: String = mutate(&mut rng, b"files/0123456789abcdef0123")
                    .iter()
                    .map(|&b| match b {
                        b'A'..=b'Z'
                        | b'a'..=b'z'
                        | b'0'..=b'9'
                        | b'-'
                        | b'.'
                        | b'_'
                        | b'~'
                        | b'/'
                        | b'%' => (b as char).to_string(),
                        _ => format!("%{b:02X}"),
                    })
                    .collect();
                let method = *rng.pick(&["GET", "POST", "PUT", "DELETE"]);
                let base = *rng.pick(&["/api/", "/api/runs/", "/", "/api/files/"]);
                (
                    method,
                    format!("{base}{tail}"),
                    Vec::new(),
                    "application/json",
                )
            }
        };
        let headers = [("host", "127.0.0.1:8188"), ("content-type", ctype)];
        let (status, answer, _) = send(&site.server, method, &path, &body, &headers).await;
        *seen.entry(status.as_u16()).or_insert(0usize) += 1;
        assert!(
            status.as_u16() < 500 || status == StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path} (seed {seed}, request {requests}) answered {status}: {answer}\n{}",
            String::from_utf8_lossy(&body)
        );
    }
    // Let the queued runs end, then check what they may have touched.
    for _ in 0..3000 {
        if call(&site.server, "GET", "/api/runs", "")
            .await
            .1
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    site.still_up().await;
    assert_eq!(Site::listing(&site.outside), outside_before, "seed {seed}");
    let root = Site::listing(site.base.parent().unwrap());
    assert!(
        root.iter()
            .all(|f| f.starts_with("base") || f.starts_with("outside")),
        "{root:?}"
    );
    eprintln!(
        "{requests} requests in {:.1} s, answers by status: {seen:?}",
        started.elapsed().as_secs_f64()
    );
    // The fuzzing reached the executor, not only the parser.
    assert!(seen.get(&202).is_some_and(|&n| n >= 20), "{seen:?}");
}

// ---- 6 (continued): what nodes allocate inside themselves, and models ---------

/// A served training run from `config` (a file in the base folder), on four
/// images of the shapes world encoded by the tiny pipeline.
fn training(config: &str) -> String {
    format!(
        "version: 1\nnodes:\n  \
         pipe: {{type: pixart.load, inputs: {{path: fixtures/tiny-pixart}}}}\n  \
         world: {{type: dataset.shapes, inputs: {{path: world, count: 4}}}}\n  \
         data: {{type: dataset.folder, inputs: {{path: \"${{world.path}}\", resolution: 64}}}}\n  \
         feats: {{type: train.precompute, inputs: {{dataset: \"${{data.dataset}}\", tokenizer: \"${{pipe.tokenizer}}\", \
         encoder: \"${{pipe.text_encoder}}\", vae: \"${{pipe.vae}}\", path: cache}}}}\n  \
         stage: {{type: train.pixart, inputs: {{features: \"${{feats.features}}\", {config}, steps: 1, batch: 2, \
         warmup: 0, checkpoint_every: 0, out: run}}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_and_model_memory_are_counted_before_they_are_taken() {
    // The finding: a config file the client wrote (text.save can) sizes what
    // train.pixart makes. 64 blocks 8192 wide: a terabyte of training state.
    let site = site();
    let huge = serde_json::json!({
        "num_attention_heads": 16, "attention_head_dim": 512, "num_layers": 64,
        "sample_size": 8, "in_channels": 4, "out_channels": 8, "caption_channels": 32,
    });
    let (_, written, _) = call(
        &site.server,
        "POST",
        "/api/runs",
        text_save_text("huge.json", &huge.to_string()),
    )
    .await;
    let run = wait_done(&site.server, written["run_id"].as_str().unwrap()).await;
    assert_eq!(run["state"], "finished", "{run}");
    let said = site.refused(&training("config: out/huge.json")).await;
    assert!(
        said.contains("training this transformer") && said.contains("a run may hold here"),
        "{said}"
    );
    // Widths past any PixArt's are refused before anything is sized by them.
    let wide = huge.to_string().replace(
        "\"attention_head_dim\":512",
        "\"attention_head_dim\":100000",
    );
    std::fs::write(site.base.join("wide.json"), wide).unwrap();
    let said = site.refused(&training("config: wide.json")).await;
    assert!(said.contains("attention_head_dim"), "{said}");
    // train.vae: a config past any VAE's, then one within bounds but too large.
    let vae = |channels: &str| {
        format!(
            "version: 1\nnodes:\n  \
             world: {{type: dataset.shapes, inputs: {{path: vworld, count: 2}}}}\n  \
             data: {{type: dataset.folder, inputs: {{path: \"${{world.path}}\", resolution: 64}}}}\n  \
             vae: {{type: train.vae, inputs: {{dataset: \"${{data.dataset}}\", config: {channels}, steps: 1, out: vae}}}}\n"
        )
    };
    std::fs::write(
        site.base.join("vae-wide.json"),
        r#"{"block_out_channels": [1000000], "norm_num_groups": 1}"#,
    )
    .unwrap();
    let said = site.refused(&vae("vae-wide.json")).await;
    assert!(said.contains("block_out_channels"), "{said}");
    std::fs::write(
        site.base.join("vae-big.json"),
        r#"{"block_out_channels": [16384, 16384, 16384, 16384], "layers_per_block": 8, "norm_num_groups": 32}"#,
    )
    .unwrap();
    let said = site.refused(&vae("vae-big.json")).await;
    assert!(said.contains("training this VAE"), "{said}");
    // The tiny model trains within the budget, served.
    let run = site.run(&training("init: \"${pipe.transformer}\"")).await;
    assert_eq!(run["state"], "finished", "{run}");

    // Models count when they load, against the model budget: the tiny pipeline
    // (about 1 MiB of weights) under a budget of 64 KiB, then under the default.
    let save = "version: 1\nnodes:\n  \
                pipe: {type: pixart.load, inputs: {path: fixtures/tiny-pixart}}\n  \
                save: {type: pipeline.save, inputs: {transformer: \"${pipe.transformer}\", \
                tokenizer: fixtures/tiny-pixart/tokenizer, text_encoder: fixtures/tiny-pixart/text_encoder, \
                vae: fixtures/tiny-pixart/vae, out: saved}}\n";
    let small = site_config(|c| c.run_model_memory_limit = 64 << 10);
    let said = small.refused(save).await;
    assert!(
        said.contains("loading the") && said.contains("model memory"),
        "{said}"
    );
    let run = site.run(save).await;
    assert_eq!(run["state"], "finished", "{run}");
    site.still_up().await;
}

fn text_save_text(path: &str, text: &str) -> String {
    format!(
        "version: 1\nnodes:\n  t: {{type: text.save, inputs: {{text: {}, path: \"{path}\"}}}}\n",
        serde_json::to_string(text).unwrap()
    )
}

// ---- disk: a quota for the output folder, and room left on its disk -----------

/// Bytes of the files below `dir`, the server's own `.pixart` aside.
fn bytes_below(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if e.file_name() == ".pixart" {
                continue;
            }
            if meta.is_dir() {
                pending.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_folder_has_a_quota_and_the_disk_keeps_room() {
    const QUOTA: u64 = 256 << 10;
    let site = site_config(|c| c.out_quota = Some(QUOTA));
    let kept = site.run(&text_save("kept.txt")).await;
    assert_eq!(kept["state"], "finished", "{kept}");
    // The finding: dataset.shapes with ten million images from one request.
    let said = site
        .refused(
            "version: 1\nnodes:\n  w: {type: dataset.shapes, inputs: {path: world, count: 10000000}}\n",
        )
        .await;
    assert!(said.contains("quota"), "{said}");
    let held = bytes_below(&site.out);
    assert!(held <= QUOTA, "the output folder holds {held} bytes");
    // Uploads count too.
    let mut upload = b"\x89PNG\r\n\x1a\n".to_vec();
    upload.resize(QUOTA as usize, 7);
    let (status, body, _) = call(&site.server, "POST", "/api/uploads", &upload).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    // Other writers: a tensor, a model folder.
    let said = site.refused(&noises("[256, 256]")).await;
    assert!(said.contains("quota"), "{said}");
    // Deleting outputs makes room again.
    std::fs::remove_dir_all(site.out.join("world")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let again = site.run(&text_save("again.txt")).await;
    assert_eq!(again["state"], "finished", "{again}");
    assert_eq!(std::fs::read(site.out.join("kept.txt")).unwrap(), b"pwned");
    site.still_up().await;

    // Without a quota, a write that would leave the disk with less than
    // `keep_free` fails (here: more than any disk has).
    let full = site_config(|c| c.keep_free = u64::MAX / 4);
    let said = full.refused(&text_save("x.txt")).await;
    assert!(said.contains("free on the output folder's disk"), "{said}");
    let (status, _, _) = call(&full.server, "POST", "/api/uploads", &upload[..64]).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    full.still_up().await;
}

// ---- 7 (continued): slow bodies and event streams ------------------------------

/// A server on a loopback port with `tune`d settings.
async fn listening(
    tune: impl FnOnce(&mut ServerConfig),
) -> (tempfile::TempDir, std::net::SocketAddr) {
    let root = tempfile::tempdir().unwrap();
    let (reg, _) = common::registry();
    let mut config = ServerConfig {
        out_dir: root.path().join("out"),
        base_dir: root.path().to_path_buf(),
        ..ServerConfig::default()
    };
    tune(&mut config);
    let state = State::start(reg, Executor::new(CachePolicy::default()), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pixart_runtime::server::serve(state, listener));
    (root, addr)
}

/// Reads from `s` until the end of the response head (or the connection's end).
async fn response_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    use tokio::io::AsyncWriteExt;
    let (_root, addr) = listening(|c| c.body_timeout = std::time::Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /api/validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/yaml\r\n\
          Content-Length: 100\r\n\r\nversion: 1\n",
    )
    .await
    .unwrap();
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // The same for an upload sent as chunks that stop coming.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n\
          Transfer-Encoding: chunked\r\n\r\n8\r\n\x89PNG\r\n\x1a\n\r\n",
    )
    .await
    .unwrap();
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?}");
    // Still serving.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/nodes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert!(response_head(&mut s).await.starts_with("HTTP/1.1 200"));
}

async fn open_event_stream(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = response_head(&mut s).await;
    (s, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_bounded_in_number_and_message_size() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_root, addr) = listening(|c| c.max_event_streams = 2).await;
    let (mut first, head) = open_event_stream(addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    let (_second, head) = open_event_stream(addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    let (_, head) = open_event_stream(addr).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head:?}");
    // A client message over 64 KiB (a masked binary frame) ends that stream.
    let payload = vec![0x5au8; (64 << 10) + 1];
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend((payload.len() as u64).to_be_bytes());
    let mask = [1u8, 2, 3, 4];
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let _ = first.write_all(&frame).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        first.read_to_end(&mut rest),
    )
    .await;
    assert!(ended.is_ok(), "the stream was still open after 5 s");
    // Its slot comes back.
    let mut reopened = String::new();
    for _ in 0..50 {
        let (_s, head) = open_event_stream(addr).await;
        reopened = head;
        if reopened.starts_with("HTTP/1.1 101") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reopened.starts_with("HTTP/1.1 101"), "{reopened:?}");
}
