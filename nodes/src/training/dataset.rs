//! Training data: a folder of images with captions (`name.png` + `name.txt`, the
//! layout the captioner also writes) or a JSONL manifest (`{"image": …, "caption": …}`
//! per line), indexed once; images are decoded later, by the feature precompute.

use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub image: PathBuf,
    pub caption: String,
    /// A class label for class-conditional pre-training (`name.label` next to
    /// the image, or `"label"` in the manifest).
    pub label: Option<String>,
}

/// An indexed dataset and the resolution its stage trains at.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub source: PathBuf,
    pub resolution: usize,
    /// Crop each image to its nearest aspect-ratio bucket instead of a square.
    pub buckets: bool,
    pub items: Vec<Item>,
}

/// Indexes a folder: every image with a caption file of the same stem, in name order.
pub fn read_folder(dir: &Path) -> Result<Vec<Item>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    images.sort();
    if images.is_empty() {
        return Err(format!("{}: no .png/.jpg images", dir.display()));
    }
    let mut items = Vec::with_capacity(images.len());
    let mut missing = Vec::new();
    for image in images {
        let caption_file = image.with_extension("txt");
        match std::fs::read_to_string(&caption_file) {
            Ok(text) => items.push(Item {
                label: std::fs::read_to_string(image.with_extension("label"))
                    .ok()
                    .map(|l| l.trim().to_string()),
                image,
                caption: text.trim().to_string(),
            }),
            Err(_) => missing.push(
                image
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        return Err(format!(
            "{}: {} image(s) have no caption file (name.txt next to name.png): {}{}",
            dir.display(),
            missing.len(),
            shown.join(", "),
            if missing.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        ));
    }
    Ok(items)
}

/// Reads a JSONL manifest; image paths are relative to the manifest's folder.
/// Each goes through `allow` (the run's confinement) like a path the workflow names.
pub fn read_manifest(
    file: &Path,
    allow: impl Fn(&Path) -> Result<PathBuf, String>,
) -> Result<Vec<Item>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| format!("{}:{}: {msg}", file.display(), i + 1);
        let row: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let image = row
            .get("image")
            .and_then(|v| v.as_str())
            .ok_or_else(|| at("needs a string `image`".into()))?;
        let caption = row
            .get("caption")
            .and_then(|v| v.as_str())
            .ok_or_else(|| at("needs a string `caption`".into()))?;
        let path = allow(&dir.join(image)).map_err(at)?;
        if !path.is_file() {
            return Err(at(format!("image {} does not exist", path.display())));
        }
        items.push(Item {
            image: path,
            caption: caption.trim().to_string(),
            label: row
                .get("label")
                .and_then(|v| v.as_str())
                .map(|l| l.trim().to_string()),
        });
    }
    if items.is_empty() {
        return Err(format!("{}: the manifest lists no images", file.display()));
    }
    Ok(items)
}

pub struct DatasetFolder {
    spec: NodeSpec,
}

impl DatasetFolder {
    fn new() -> Self {
        DatasetFolder {
            spec: NodeSpec::new("dataset.folder", 1)
                .category("training")
                .describe(
                    "Indexes training data: a folder of images with captions (name.png + name.txt) or a \
                     JSONL manifest ({\"image\": …, \"caption\": …} per line, paths relative to it), for a \
                     stage training at `resolution` pixels.",
                )
                .input(InputSpec::new("path", PortType::Path).describe("A folder or a .jsonl manifest."))
                .input(
                    InputSpec::new("resolution", PortType::Int)
                        .default(256)
                        .min(64.0)
                        .max(4096.0)
                        .describe("Training resolution (side, pixels; multiple of 16)."),
                )
                .input(
                    InputSpec::new("buckets", PortType::Bool)
                        .default(false)
                        .describe(
                            "Multi-scale training: crop each image to the nearest of the official 40 \
                             aspect-ratio buckets at this resolution instead of a centre square.",
                        ),
                )
                .output("dataset", PortType::Dataset, "the indexed dataset")
                .output("count", PortType::Int, "number of images"),
        }
    }
}

impl Node for DatasetFolder {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn fingerprint(&self, ctx: &NodeContext, inputs: &Inputs) -> Option<String> {
        crate::fsutil::input_file_fingerprint(ctx, inputs, "path")
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let path = ctx.input_path(inputs.path("path")?)?;
        let resolution = inputs.int("resolution")? as usize;
        if !resolution.is_multiple_of(16) {
            return Err(NodeError::input(
                "resolution",
                format!("{resolution} is not a multiple of 16"),
            ));
        }
        let items = if path.is_dir() {
            read_folder(&path)
        } else {
            read_manifest(&path, |p| ctx.input_path(p).map_err(|e| e.to_string()))
        }
        .map_err(|e| NodeError::input("path", e))?;
        let count = items.len() as i64;
        let bytes = items.iter().map(|i| i.caption.len() + 64).sum();
        let dataset = Dataset {
            source: path,
            resolution,
            buckets: inputs.bool("buckets")?,
            items,
        };
        Ok(Outputs::one(
            "dataset",
            Value::Handle(Handle::new(PortType::Dataset, bytes, dataset)),
        )
        .with("count", Value::Int(count)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(DatasetFolder::new())]
}
