//! Where a confined run (a workflow from the network) may read and write.
//!
//! Every path a node of such a run touches goes through [`Confinement`]: it is
//! made absolute, its symbolic links are resolved, and the *resolved* path must lie
//! inside the server's folders. Checking what a path leads to, not the text a
//! workflow wrote, is what keeps a link inside the output folder from leading out.
//! A folder a node reads or fills is checked whole: every link in it must resolve
//! inside, so a loader that opens `folder/transformer/weights.safetensors` by
//! itself cannot be led out either.
//!
//! Hard links need no resolving to lead elsewhere, so a confined run refuses
//! files with more than one link.
//!
//! The time between this check and a node opening the file is safe because of
//! what a served workflow can do, not because of how files are opened: no node
//! creates links (outputs are written to fresh temporary files and renamed into
//! place, which replaces a link rather than following it), so the links a check
//! sees are the only ones the run can meet.

use std::collections::HashSet;
use std::fs::Metadata;
use std::path::{Component, Path, PathBuf};

/// Entries a folder that a confined run reads or fills may hold: each is checked.
pub const MAX_FOLDER_ENTRIES: usize = 200_000;

/// The folders of a confined run, resolved once when the run starts.
#[derive(Debug)]
pub struct Confinement {
    /// Reads may come from the base folder and the output folder.
    read_roots: Vec<PathBuf>,
    /// Writes go below the output folder (never to it, never into hidden folders).
    out: PathBuf,
}

impl Confinement {
    /// Resolves `base` and `out` (creating `out` when it is missing).
    pub fn new(base: &Path, out: &Path) -> std::io::Result<Confinement> {
        std::fs::create_dir_all(out)?;
        let out = out.canonicalize()?;
        Ok(Confinement {
            read_roots: vec![base.canonicalize()?, out.clone()],
            out,
        })
    }

    /// The resolved path of `full` (written `given` in the workflow) for reading.
    /// A folder is checked with all it holds.
    pub fn read(&self, given: &Path, full: &Path) -> Result<PathBuf, String> {
        let resolved = resolve(given, full)?;
        let Some(root) = self.read_roots.iter().find(|r| resolved.starts_with(r)) else {
            return Err(refusal(
                given,
                "served workflows may only use files inside the server's folders",
            ));
        };
        // A root itself is no input: loaders look beside the folder they are given
        // (a pipeline's `vae/` next to its `transformer/`), which would leave it.
        if self.read_roots.contains(&resolved) {
            return Err(refusal(
                given,
                "the server's folder itself cannot be an input: name a file or folder inside it",
            ));
        }
        // Hidden files (`.env`, `.git/`, the server's own data) are not inputs;
        // uploads, which the server keeps hidden, are.
        let hidden = resolved
            .strip_prefix(root)
            .is_ok_and(|rest| rest.components().any(is_hidden));
        if hidden && !resolved.starts_with(self.out.join(".pixart").join("uploads")) {
            return Err(refusal(
                given,
                "served workflows may not read hidden files or folders",
            ));
        }
        match std::fs::metadata(&resolved) {
            Ok(m) if m.is_dir() => self.check_folder(given, &resolved, Access::Read)?,
            Ok(m) => single_link(given, &m)?,
            Err(_) => {} // missing: the node says so when it opens it
        }
        Ok(resolved)
    }

    /// The resolved path of `full` for writing a file or filling a folder: strictly
    /// inside the output folder and outside hidden folders. An existing folder is
    /// checked with all it holds (nodes read and append inside what they fill).
    pub fn write(&self, given: &Path, full: &Path) -> Result<PathBuf, String> {
        let resolved = resolve(given, full)?;
        self.writable(given, &resolved)?;
        match std::fs::metadata(&resolved) {
            Ok(m) if m.is_dir() => self.check_folder(given, &resolved, Access::Write)?,
            Ok(m) => single_link(given, &m)?,
            Err(_) => {}
        }
        Ok(resolved)
    }

    /// The resolved path of a file the server hands out (`/api/files`): a regular
    /// file inside the output folder, with no other hard links.
    pub fn served_file(&self, path: &Path) -> Result<PathBuf, String> {
        let resolved = path.canonicalize().map_err(|e| refusal(path, e))?;
        if !resolved.starts_with(&self.out) {
            return Err(refusal(path, "leads outside the output folder"));
        }
        let meta = std::fs::metadata(&resolved).map_err(|e| refusal(path, e))?;
        if !meta.is_file() {
            return Err(refusal(path, "not a file"));
        }
        single_link(path, &meta)?;
        Ok(resolved)
    }

    fn writable(&self, given: &Path, resolved: &Path) -> Result<(), String> {
        let Ok(rest) = resolved.strip_prefix(&self.out) else {
            return Err(refusal(
                given,
                "served workflows may only write inside the server's output folder",
            ));
        };
        if rest.as_os_str().is_empty() {
            return Err(refusal(
                given,
                "the output folder itself cannot be written: name a file or folder inside it",
            ));
        }
        if rest.components().any(is_hidden) {
            return Err(refusal(
                given,
                "outputs may not be written to hidden files or folders",
            ));
        }
        Ok(())
    }

    /// Walks `dir` (resolved) without recursion: every link must lead where the
    /// access allows, and no file may have other hard links.
    fn check_folder(&self, given: &Path, dir: &Path, access: Access) -> Result<(), String> {
        let mut pending = vec![dir.to_path_buf()];
        let mut seen: HashSet<PathBuf> = HashSet::from([dir.to_path_buf()]);
        let mut entries = 0usize;
        while let Some(folder) = pending.pop() {
            let listing = std::fs::read_dir(&folder).map_err(|e| refusal(given, e))?;
            for entry in listing {
                let entry = entry.map_err(|e| refusal(given, e))?;
                entries += 1;
                if entries > MAX_FOLDER_ENTRIES {
                    return Err(refusal(
                        given,
                        format!(
                            "the folder holds more than {MAX_FOLDER_ENTRIES} entries, more than \
                             a served workflow may use"
                        ),
                    ));
                }
                let path = entry.path();
                let kind = entry.file_type().map_err(|e| refusal(given, e))?;
                let (target, meta) = if kind.is_symlink() {
                    let inner = shown(given, dir, &path);
                    let target = path.canonicalize().map_err(|e| {
                        refusal(&inner, format!("a link that cannot be followed ({e})"))
                    })?;
                    match access {
                        Access::Read if !self.read_roots.iter().any(|r| target.starts_with(r)) => {
                            return Err(refusal(
                                &inner,
                                "a link that leads outside the server's folders",
                            ))
                        }
                        Access::Write => self.writable(&inner, &target)?,
                        Access::Read => {}
                    }
                    let meta = std::fs::metadata(&target).map_err(|e| refusal(&inner, e))?;
                    (target, meta)
                } else {
                    let meta = entry.metadata().map_err(|e| refusal(given, e))?;
                    (path.clone(), meta)
                };
                if meta.is_dir() {
                    if seen.insert(target.clone()) {
                        pending.push(target);
                    }
                } else {
                    single_link(&shown(given, dir, &path), &meta)?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Access {
    Read,
    Write,
}

/// `full` with its existing part resolved (links followed); the part that does
/// not exist yet is kept as written (it holds no links: a node creates it).
fn resolve(given: &Path, full: &Path) -> Result<PathBuf, String> {
    if given
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(refusal(
            given,
            "`..` is not allowed in paths of served workflows",
        ));
    }
    let full = std::path::absolute(full).map_err(|e| refusal(given, e))?;
    let mut existing = full.as_path();
    let mut missing = Vec::new();
    loop {
        match std::fs::symlink_metadata(existing) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match (existing.file_name(), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        missing.push(name.to_os_string());
                        existing = parent;
                    }
                    _ => return Err(refusal(given, e)),
                }
            }
            Err(e) => return Err(refusal(given, e)),
        }
    }
    // A link that exists but leads nowhere fails here: writing through it would
    // create its target wherever it points.
    let mut resolved = existing
        .canonicalize()
        .map_err(|e| refusal(given, format!("a link that cannot be followed ({e})")))?;
    resolved.extend(missing.iter().rev());
    Ok(resolved)
}

#[cfg(unix)]
fn single_link(given: &Path, meta: &Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if meta.is_file() && meta.nlink() > 1 {
        return Err(refusal(
            given,
            "the file has other hard links, which may lead outside the server's folders",
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn single_link(_given: &Path, _meta: &Metadata) -> Result<(), String> {
    Ok(())
}

fn is_hidden(c: Component) -> bool {
    c.as_os_str().to_string_lossy().starts_with('.')
}

/// How an entry inside the folder `given` (resolved as `dir`) is named in errors.
fn shown(given: &Path, dir: &Path, entry: &Path) -> PathBuf {
    given.join(entry.strip_prefix(dir).unwrap_or(entry))
}

fn refusal(given: &Path, why: impl std::fmt::Display) -> String {
    format!("{}: {why}", given.display())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Folders {
        _root: tempfile::TempDir,
        base: PathBuf,
        out: PathBuf,
        outside: PathBuf,
    }

    fn folders() -> (Folders, Confinement) {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("base");
        let out = base.join("out");
        let outside = root.path().join("outside");
        for d in [&out, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(outside.join("secret.txt"), "secret").unwrap();
        std::fs::write(base.join("input.txt"), "input").unwrap();
        let c = Confinement::new(&base, &out).unwrap();
        let f = Folders {
            _root: root,
            base,
            out,
            outside,
        };
        (f, c)
    }

    fn read(c: &Confinement, base: &Path, p: &str) -> Result<PathBuf, String> {
        c.read(Path::new(p), &base.join(p))
    }

    fn write(c: &Confinement, out: &Path, p: &str) -> Result<PathBuf, String> {
        c.write(Path::new(p), &out.join(p))
    }

    #[test]
    fn inside_paths_resolve_and_missing_parts_are_kept() {
        let (f, c) = folders();
        let got = read(&c, &f.base, "input.txt").unwrap();
        assert_eq!(got, f.base.canonicalize().unwrap().join("input.txt"));
        let got = write(&c, &f.out, "new/deeper/a.png").unwrap();
        assert_eq!(got, f.out.canonicalize().unwrap().join("new/deeper/a.png"));
    }

    #[test]
    fn the_output_root_hidden_folders_and_dot_dot_are_refused() {
        let (f, c) = folders();
        for p in [
            "",
            ".",
            "./",
            ".pixart/history.json",
            "a/.hidden/b",
            "a/../b",
        ] {
            assert!(write(&c, &f.out, p).is_err(), "{p:?}");
        }
        let abs = f.out.display().to_string();
        assert!(c.write(Path::new(&abs), &f.out).is_err());
        assert!(read(&c, &f.base, "../outside/secret.txt").is_err());
    }

    #[test]
    fn links_are_judged_by_where_they_lead() {
        let (f, c) = folders();
        symlink(f.outside.join("secret.txt"), f.out.join("to-file")).unwrap();
        symlink(&f.outside, f.out.join("to-dir")).unwrap();
        symlink(f.out.join("to-file"), f.out.join("to-link")).unwrap();
        symlink(f.outside.join("nothing-yet"), f.out.join("dangling")).unwrap();
        symlink(f.out.join(".pixart"), f.out.join("to-data")).unwrap();
        for p in ["to-file", "to-dir/secret.txt", "to-link", "dangling"] {
            assert!(read(&c, &f.base, &format!("out/{p}")).is_err(), "read {p}");
            assert!(write(&c, &f.out, p).is_err(), "write {p}");
        }
        assert!(write(&c, &f.out, "to-data/history.json").is_err());
        assert!(write(&c, &f.out, "to-dir/new/file.txt").is_err());
        // A link that stays inside is followed.
        std::fs::write(f.out.join("real.txt"), "x").unwrap();
        symlink(f.out.join("real.txt"), f.out.join("alias.txt")).unwrap();
        let got = write(&c, &f.out, "alias.txt").unwrap();
        assert_eq!(got, f.out.canonicalize().unwrap().join("real.txt"));
    }

    #[test]
    fn folders_are_checked_whole() {
        let (f, c) = folders();
        let model = f.base.join("model/transformer");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        assert!(read(&c, &f.base, "model").is_ok());
        symlink(f.outside.join("secret.txt"), model.join("w.safetensors")).unwrap();
        let err = read(&c, &f.base, "model").unwrap_err();
        assert!(err.contains("model/transformer/w.safetensors"), "{err}");
        // A loop of links ends.
        let looped = f.out.join("loop");
        std::fs::create_dir_all(&looped).unwrap();
        symlink(&looped, looped.join("again")).unwrap();
        assert!(write(&c, &f.out, "loop").is_ok());
    }

    #[test]
    fn hidden_files_are_not_inputs_but_uploads_are() {
        let (f, c) = folders();
        std::fs::write(f.base.join(".env"), "TOKEN=x").unwrap();
        let uploads = f.out.join(".pixart/uploads");
        std::fs::create_dir_all(&uploads).unwrap();
        std::fs::write(uploads.join("a.png"), "png").unwrap();
        std::fs::write(f.out.join(".pixart/history.jsonl"), "{}").unwrap();
        assert!(read(&c, &f.base, ".env").is_err());
        assert!(read(&c, &f.base, "out/.pixart/history.jsonl").is_err());
        assert!(read(&c, &f.base, "out/.pixart/uploads/a.png").is_ok());
    }

    #[test]
    fn a_root_itself_is_not_an_input() {
        let (f, c) = folders();
        for p in [".", "", "./", "out"] {
            assert!(read(&c, &f.base, p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn hard_links_are_refused() {
        let (f, c) = folders();
        let linked = f.out.join("linked.txt");
        if std::fs::hard_link(f.outside.join("secret.txt"), &linked).is_err() {
            return; // the filesystem has none
        }
        assert!(read(&c, &f.base, "out/linked.txt").is_err());
        assert!(write(&c, &f.out, "linked.txt").is_err());
        std::fs::create_dir_all(f.out.join("data")).unwrap();
        std::fs::rename(&linked, f.out.join("data/linked.txt")).unwrap();
        assert!(read(&c, &f.base, "out/data").is_err());
        assert!(write(&c, &f.out, "data").is_err());
    }
}
