//! An example plugin: three real nodes to copy from.
//!
//! - `starter/image.adjust`: brightness, contrast, saturation and gamma of an image;
//! - `starter/prompt.template`: `{a|b|c}` alternatives picked by a seed, and
//!   `{name}` fields filled in (prompt batches for sweeps);
//! - `starter/latents.blend`: linear or spherical interpolation of two latents.

use pixart_plugin_sdk::*;

struct Starter;

impl Plugin for Starter {
    fn info() -> PluginInfo {
        PluginInfo::new("starter", env!("CARGO_PKG_VERSION"), "Example nodes: image grade, prompt template, latent blend")
            .node(
                NodeDecl::new("image.adjust", 1)
                    .category("image")
                    .describe("Brightness, contrast, saturation and gamma of an image batch")
                    .input(InputDecl::new("image", PortType::Image))
                    .input(InputDecl::new("brightness", PortType::Float).default(0.0).range(-1.0, 1.0).describe("added to every channel"))
                    .input(InputDecl::new("contrast", PortType::Float).default(1.0).range(0.0, 4.0).describe("scale around mid-gray"))
                    .input(InputDecl::new("saturation", PortType::Float).default(1.0).range(0.0, 4.0).describe("0 = grayscale"))
                    .input(InputDecl::new("gamma", PortType::Float).default(1.0).range(0.1, 10.0).describe("> 1 brightens the mid-tones"))
                    .output("image", PortType::Image, "the adjusted image, clamped to 0..1"),
            )
            .node(
                NodeDecl::new("prompt.template", 1)
                    .category("text")
                    .describe("Fills a prompt template: `{a|b|c}` picks one alternative (by seed), `{name}` takes `name=value` from `fill`; `{{` and `}}` are braces")
                    .input(InputDecl::new("template", PortType::Text))
                    .input(InputDecl::new("fill", PortType::ListOf(ItemType::Text)).default(Literal::Many(Vec::new())).describe("name=value pairs"))
                    .input(InputDecl::new("seed", PortType::Int).default(0i64).range(0.0, 4294967295.0))
                    .output("text", PortType::Text, "the prompt"),
            )
            .node(
                NodeDecl::new("latents.blend", 1)
                    .category("latent")
                    .describe("Interpolates two latents of one shape: (1-t)·a + t·b, or along the great circle (slerp), which keeps the norm of noise")
                    .input(InputDecl::new("a", PortType::Latents))
                    .input(InputDecl::new("b", PortType::Latents))
                    .input(InputDecl::new("t", PortType::Float).default(0.5).range(0.0, 1.0))
                    .input(InputDecl::new("mode", PortType::choice(&["linear", "slerp"])).default("linear"))
                    .output("latents", PortType::Latents, "the blend, with a's image size"),
            )
    }

    fn run(node: &str, mut inputs: Inputs) -> Result<Outputs, RunError> {
        match node {
            "image.adjust" => adjust(&mut inputs),
            "prompt.template" => template(&mut inputs),
            "latents.blend" => blend(&mut inputs),
            _ => Err(RunError::unknown_node(node)),
        }
    }
}

plugin!(Starter);

fn adjust(inputs: &mut Inputs) -> Result<Outputs, RunError> {
    let image = inputs.image("image")?;
    let brightness = inputs.float("brightness")? as f32;
    let contrast = inputs.float("contrast")? as f32;
    let saturation = inputs.float("saturation")? as f32;
    let gamma = inputs.float("gamma")? as f32;
    let dims = image.dims();
    let channels = *dims.last().unwrap_or(&1);
    let mut data = image.to_f32();
    for pixel in data.chunks_mut(channels.max(1)) {
        if channels >= 3 {
            // Rec. 709 luma: saturation moves each colour towards or away from it.
            let luma = 0.2126 * pixel[0] + 0.7152 * pixel[1] + 0.0722 * pixel[2];
            for c in &mut pixel[..3] {
                *c = luma + (*c - luma) * saturation;
            }
        }
        for c in pixel.iter_mut().take(3) {
            let v = (*c - 0.5) * contrast + 0.5 + brightness;
            *c = v.clamp(0.0, 1.0).powf(1.0 / gamma);
        }
    }
    Ok(Outputs::new().image("image", Tensor::new(&dims, &data)?))
}

fn template(inputs: &mut Inputs) -> Result<Outputs, RunError> {
    let template = inputs.text("template")?;
    let mut fields = Vec::new();
    for item in inputs.list("fill")? {
        let Scalar::Text(pair) = item else {
            return Err(RunError::bad_input("fill", "items are `name=value` text"));
        };
        let Some((name, value)) = pair.split_once('=') else {
            return Err(RunError::bad_input(
                "fill",
                format!("`{pair}` is not `name=value`"),
            ));
        };
        fields.push((name.trim().to_string(), value.to_string()));
    }
    let mut rng = SplitMix(inputs.int("seed")? as u64);
    let mut out = String::new();
    let mut rest = template.as_str();
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let brace = &rest[i..];
        if brace.starts_with("{{") || brace.starts_with("}}") {
            out.push_str(&brace[..1]);
            rest = &brace[2..];
            continue;
        }
        if brace.starts_with('}') {
            return Err(RunError::bad_input(
                "template",
                "a `}` without its `{` (write `}}` for a brace)",
            ));
        }
        let Some(end) = brace.find('}') else {
            return Err(RunError::bad_input(
                "template",
                "a `{` without its `}` (write `{{` for a brace)",
            ));
        };
        let inner = &brace[1..end];
        if inner.contains('|') {
            let options: Vec<&str> = inner.split('|').collect();
            out.push_str(options[(rng.next() % options.len() as u64) as usize]);
        } else {
            let Some((_, value)) = fields.iter().find(|(n, _)| n == inner.trim()) else {
                return Err(RunError::bad_input(
                    "fill",
                    format!("no value for `{{{inner}}}`"),
                ));
            };
            out.push_str(value);
        }
        rest = &brace[end + 1..];
    }
    out.push_str(rest);
    Ok(Outputs::new().text("text", out))
}

/// SplitMix64: a tiny, well-mixed generator, so a seed gives the same prompt
/// on every machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn blend(inputs: &mut Inputs) -> Result<Outputs, RunError> {
    let a = inputs.latents("a")?;
    let b = inputs.latents("b")?;
    let t = inputs.float("t")? as f32;
    let slerp = inputs.text("mode")? == "slerp";
    let (dims_a, dims_b) = (a.data.dims(), b.data.dims());
    if dims_a != dims_b {
        return Err(RunError::bad_input(
            "b",
            format!("shape {dims_b:?} differs from a's {dims_a:?}"),
        ));
    }
    let (xa, xb) = (a.data.to_f32(), b.data.to_f32());
    let (wa, wb) = if slerp {
        slerp_weights(&xa, &xb, t)
    } else {
        (1.0 - t, t)
    };
    let mixed: Vec<f32> = xa.iter().zip(&xb).map(|(x, y)| wa * x + wb * y).collect();
    let data = Tensor::new(&dims_a, &mixed)?;
    Ok(Outputs::new().latents(
        "latents",
        Latents {
            data,
            image_size: a.image_size,
        },
    ))
}

/// Weights of a and b for spherical interpolation; nearly parallel vectors
/// fall back to linear.
fn slerp_weights(a: &[f32], b: &[f32], t: f32) -> (f32, f32) {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cos = (dot / (na * nb).max(f64::MIN_POSITIVE)).clamp(-1.0, 1.0);
    let theta = cos.acos();
    if theta.sin().abs() < 1e-6 {
        return (1.0 - t, t);
    }
    let t = t as f64;
    (
        (((1.0 - t) * theta).sin() / theta.sin()) as f32,
        ((t * theta).sin() / theta.sin()) as f32,
    )
}
