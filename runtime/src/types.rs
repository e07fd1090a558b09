//! Port types and the explicit rules for which output may feed which input.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The type of a node input or output, or of a workflow parameter.
///
/// Model handles (`TextEncoder`, `Denoiser`, …) are opaque to the runtime: nodes
/// create them and other nodes downcast them; the runtime only checks the kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortType {
    Int,
    Float,
    Bool,
    String,
    /// A string restricted to the listed choices.
    Enum(Vec<String>),
    Path,
    List(Box<PortType>),
    /// Any of the scalar types (int, float, bool, string, path, enum): for nodes
    /// such as `string.format` that format whatever they are given.
    Scalar,
    Tensor,
    /// Anything that is tensor data: a Tensor, Latents, an Image or a Conditioning
    /// (for savers and inspectors).
    TensorLike,
    /// A latent-space tensor `[batch, channels, height, width]`.
    Latents,
    /// An image batch: f32 tensor `[batch, height, width, channels]` in 0..=1.
    Image,
    /// Text embeddings with their attention mask.
    Conditioning,
    TextEncoder,
    Tokenizer,
    Denoiser,
    Vae,
    Scheduler,
    Captioner,
    /// A LoRA adapter of the transformer.
    Lora,
    /// A ControlNet of the transformer.
    ControlNet,
    Dataset,
    /// Precomputed training features (VAE posteriors, T5 embeddings) on disk.
    Features,
    Checkpoint,
}

impl PortType {
    pub fn list_of(item: PortType) -> PortType {
        PortType::List(Box::new(item))
    }

    pub fn enum_of(choices: &[&str]) -> PortType {
        PortType::Enum(choices.iter().map(|c| c.to_string()).collect())
    }

    pub fn is_scalar(&self) -> bool {
        matches!(
            self,
            PortType::Int
                | PortType::Float
                | PortType::Bool
                | PortType::String
                | PortType::Path
                | PortType::Enum(_)
                | PortType::Scalar
        )
    }

    /// Whether a value of type `from` may be connected to an input of type `self`.
    ///
    /// The rules, and the only conversions the runtime makes:
    /// - identical types connect;
    /// - `Int` widens to `Float`;
    /// - `String` is accepted where a `Path` is expected (a path is written as text);
    /// - an `Enum` is accepted where a `String` is expected, or by an `Enum` whose
    ///   choices include all of its own;
    /// - `Latents` are accepted where a plain `Tensor` is expected (not the reverse);
    /// - `TensorLike` accepts a Tensor, Latents, an Image or a Conditioning;
    /// - any scalar type is accepted by `Scalar`;
    /// - lists follow the rule of their items.
    ///
    /// Nothing else converts: a `Float` never narrows to `Int`, a `Tensor` never
    /// becomes an `Image`.
    pub fn accepts(&self, from: &PortType) -> bool {
        use PortType::*;
        match (self, from) {
            (a, b) if a == b => true,
            (Float, Int) => true,
            (Path, String) => true,
            (String, Enum(_)) => true,
            (Enum(allowed), Enum(given)) => given.iter().all(|c| allowed.contains(c)),
            (Tensor, Latents) => true,
            (TensorLike, Tensor | Latents | Image | Conditioning) => true,
            (Scalar, b) => b.is_scalar(),
            (List(a), List(b)) => a.accepts(b),
            _ => false,
        }
    }

    /// Parses the type names used in workflow `params:` declarations.
    pub fn from_param_name(name: &str, choices: Option<Vec<String>>) -> Option<PortType> {
        Some(match name {
            "int" => PortType::Int,
            "float" => PortType::Float,
            "bool" => PortType::Bool,
            "string" => PortType::String,
            "path" => PortType::Path,
            "enum" => PortType::Enum(choices?),
            _ => return None,
        })
    }

    pub const PARAM_TYPE_NAMES: &'static [&'static str] =
        &["int", "float", "bool", "string", "path", "enum"];
}

impl fmt::Display for PortType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use PortType::*;
        match self {
            Enum(choices) => write!(f, "Enum[{}]", choices.join("|")),
            List(item) => write!(f, "List<{item}>"),
            other => {
                let name = match other {
                    Int => "Int",
                    Float => "Float",
                    Bool => "Bool",
                    String => "String",
                    Path => "Path",
                    Scalar => "Scalar",
                    Tensor => "Tensor",
                    TensorLike => "TensorLike",
                    Latents => "Latents",
                    Image => "Image",
                    Conditioning => "Conditioning",
                    TextEncoder => "TextEncoder",
                    Tokenizer => "Tokenizer",
                    Denoiser => "Denoiser",
                    Vae => "Vae",
                    Scheduler => "Scheduler",
                    Captioner => "Captioner",
                    Lora => "Lora",
                    ControlNet => "ControlNet",
                    Dataset => "Dataset",
                    Features => "Features",
                    Checkpoint => "Checkpoint",
                    Enum(_) | List(_) => unreachable!("handled above"),
                };
                f.write_str(name)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PortType::*;
    use super::*;

    #[test]
    fn explicit_conversions_only() {
        assert!(Float.accepts(&Int));
        assert!(!Int.accepts(&Float));
        assert!(Path.accepts(&String));
        assert!(!String.accepts(&Path));
        assert!(Tensor.accepts(&Latents));
        assert!(!Latents.accepts(&Tensor));
        assert!(!Image.accepts(&Tensor));
        assert!(Scalar.accepts(&Bool));
        assert!(!Scalar.accepts(&Tensor));
        let ab = Enum(vec!["a".into(), "b".into()]);
        let a = Enum(vec!["a".into()]);
        assert!(ab.accepts(&a));
        assert!(!a.accepts(&ab));
        assert!(String.accepts(&a));
        assert!(PortType::list_of(Float).accepts(&PortType::list_of(Int)));
        assert!(!Vae.accepts(&Denoiser));
    }
}
