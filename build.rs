//! Builds the browser editor (web-ui/, React + @xyflow with Vite) into OUT_DIR
//! and embeds it, so `pixart serve` needs no set-up beyond `cargo build`. Needs
//! Node.js 20+ and npm (the npm registry on first build); without them, or with
//! PIXART_SKIP_EDITOR=1, pixart is built without the editor and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for path in [
        "web-ui/src",
        "web-ui/index.html",
        "web-ui/package.json",
        "web-ui/package-lock.json",
        "web-ui/vite.config.js",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=PIXART_SKIP_EDITOR");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let site = out.join("web-ui");
    let files = match build_editor(Path::new("web-ui"), &site) {
        Ok(()) => list(&site, &site),
        Err(why) => {
            println!("cargo:warning=building pixart without the browser editor: {why}");
            Vec::new()
        }
    };
    let mut code = String::from("/// The editor's files, built from web-ui/ by build.rs.\npub static EDITOR: &[(&str, &[u8])] = &[\n");
    for (name, path) in files {
        code.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(out.join("editor_files.rs"), code).expect("write editor_files.rs");
}

fn build_editor(dir: &Path, site: &Path) -> Result<(), String> {
    if std::env::var_os("PIXART_SKIP_EDITOR").is_some_and(|v| !v.is_empty() && v != "0") {
        return Err("PIXART_SKIP_EDITOR is set".into());
    }
    let npm = if cfg!(windows) { "npm.cmd" } else { "npm" };
    let version = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|_| "Node.js (node) was not found".to_string())?;
    let major: u32 = String::from_utf8_lossy(&version.stdout)
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        return Err(format!("Node.js 20 or newer is needed (found {major})"));
    }
    let lock = dir.join("package-lock.json");
    let installed = dir.join("node_modules/.package-lock.json");
    let stale = match (std::fs::metadata(&lock), std::fs::metadata(&installed)) {
        (Ok(l), Ok(i)) => l.modified().ok() > i.modified().ok(),
        _ => true,
    };
    if stale {
        run(Command::new(npm).current_dir(dir).args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]))?;
    }
    run(Command::new(npm)
        .current_dir(dir)
        .args(["run", "build", "--silent"])
        .env("PIXART_UI_OUT", site))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let output = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .take(20)
                .collect::<Vec<_>>()
                .join(" | ")
        ))
    }
}

/// Every file under `dir`, as (path relative to `root` with `/`, absolute path).
fn list(root: &Path, dir: &Path) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(list(root, &path));
        } else if let Ok(rel) = path.strip_prefix(root) {
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let abs = std::fs::canonicalize(&path).unwrap_or(path);
            files.push((name, abs));
        }
    }
    files
}
