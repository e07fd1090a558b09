//! Values that flow along edges.

use crate::types::PortType;
use candle_core::Tensor;
use std::any::Any;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Text embeddings `[batch, tokens, dim]` with their attention mask `[batch, tokens]`.
#[derive(Clone, Debug)]
pub struct Conditioning {
    pub embeddings: Tensor,
    pub mask: Tensor,
    /// Encoded from the empty prompt, i.e. "no prompt": a sampler may use a
    /// checkpoint's learned null caption in its place.
    pub empty_prompt: bool,
}

/// Latents `[batch, channels, height, width]` in the model's (scaled) latent space.
#[derive(Clone, Debug)]
pub struct Latents {
    pub tensor: Tensor,
    /// The pixel size (height, width) the decoded image should finally have, when
    /// it differs from the latents' own size times the VAE factor (a sampler that
    /// generated at a binned resolution sets it; the decoder resizes and crops).
    pub image_size: Option<(usize, usize)>,
}

impl Latents {
    pub fn new(tensor: Tensor) -> Latents {
        Latents {
            tensor,
            image_size: None,
        }
    }
}

/// An opaque, shared model handle (a loaded T5, a DiT, a scheduler …).
#[derive(Clone)]
pub struct Handle {
    pub kind: PortType,
    /// Approximate resident size, so the output cache can account for it.
    pub bytes: usize,
    inner: Arc<Inner>,
    /// Called when no node of the run that made the handle reads it any more.
    on_last_use: Option<Arc<dyn Fn() + Send + Sync>>,
}

type Object = Arc<dyn Any + Send + Sync>;
type Loader = Box<dyn Fn() -> Result<Object, String> + Send + Sync>;

/// What a handle holds: the object, or how to make it on first use (once, for
/// every clone of the handle; a failure is kept and reported to each reader).
struct Inner {
    object: std::sync::OnceLock<Result<Object, String>>,
    load: Option<Loader>,
}

impl Handle {
    pub fn new<T: Any + Send + Sync>(kind: PortType, bytes: usize, inner: T) -> Handle {
        Handle::shared(kind, bytes, Arc::new(inner))
    }

    /// A handle to an object that is already shared (e.g. held by a model cache).
    pub fn shared<T: Any + Send + Sync>(kind: PortType, bytes: usize, inner: Arc<T>) -> Handle {
        let object = std::sync::OnceLock::new();
        let _ = object.set(Ok(inner as Object));
        Handle {
            kind,
            bytes,
            inner: Arc::new(Inner { object, load: None }),
            on_last_use: None,
        }
    }

    /// A handle whose object `load` makes when a node first reads it: a loader
    /// node can hand out every model of a pipeline at once while each is read
    /// from disk only when, and if, a node needs it (a T5 encodes before the
    /// transformer's weights take memory, as with memory-mapped checkpoints).
    pub fn lazy<T: Any + Send + Sync>(
        kind: PortType,
        bytes: usize,
        load: impl Fn() -> Result<Arc<T>, String> + Send + Sync + 'static,
    ) -> Handle {
        Handle {
            kind,
            bytes,
            inner: Arc::new(Inner {
                object: std::sync::OnceLock::new(),
                load: Some(Box::new(move || load().map(|t| t as Object))),
            }),
            on_last_use: None,
        }
    }

    /// The object, made now if the handle is lazy and nothing read it yet: the
    /// loader's error, or None where it is not a `T`.
    pub fn resolve<T: Any + Send + Sync>(&self) -> Result<Option<&T>, String> {
        let inner = &*self.inner;
        let object = inner.object.get_or_init(|| match &inner.load {
            Some(load) => load(),
            None => Err("an empty handle".into()),
        });
        match object {
            Ok(o) => Ok(o.downcast_ref::<T>()),
            Err(e) => Err(e.clone()),
        }
    }

    /// The object as a `T` (made now if lazy); None where it is not one or could
    /// not be made.
    pub fn downcast<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.resolve::<T>().ok().flatten()
    }

    /// Whether the object exists yet (a lazy handle nobody read has none).
    pub fn is_resolved(&self) -> bool {
        self.inner.object.get().is_some()
    }

    /// `f` runs once every node of the run that produced this handle and reads
    /// it has finished: a model can let its weights go there (and load them
    /// again when a later run asks), which the run's own references cannot.
    pub fn on_last_use(mut self, f: impl Fn() + Send + Sync + 'static) -> Handle {
        self.on_last_use = Some(Arc::new(f));
        self
    }

    /// Runs the [`Handle::on_last_use`] hook, if any.
    pub(crate) fn last_use(&self) {
        if let Some(f) = &self.on_last_use {
            f()
        }
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle<{}>", self.kind)
    }
}

#[derive(Clone, Debug)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Also carries `Enum` values.
    String(String),
    Path(PathBuf),
    List(Vec<Value>),
    Tensor(Tensor),
    Latents(Latents),
    /// f32 `[batch, height, width, channels]`, values in 0..=1.
    Image(Tensor),
    Conditioning(Conditioning),
    Handle(Handle),
}

impl Value {
    /// A short name of the value's shape of data, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "Int",
            Value::Float(_) => "Float",
            Value::Bool(_) => "Bool",
            Value::String(_) => "String",
            Value::Path(_) => "Path",
            Value::List(_) => "List",
            Value::Tensor(_) => "Tensor",
            Value::Latents(_) => "Latents",
            Value::Image(_) => "Image",
            Value::Conditioning(_) => "Conditioning",
            Value::Handle(_) => "Handle",
        }
    }

    /// Whether this value is a valid instance of `ty` (after [`Value::coerce`]).
    pub fn matches(&self, ty: &PortType) -> bool {
        match (self, ty) {
            (Value::Int(_), PortType::Int) => true,
            (Value::Float(_), PortType::Float) => true,
            (Value::Bool(_), PortType::Bool) => true,
            (Value::String(_), PortType::String) => true,
            (Value::String(s), PortType::Enum(choices)) => choices.contains(s),
            (Value::Path(_), PortType::Path) => true,
            (Value::List(items), PortType::List(item)) => items.iter().all(|v| v.matches(item)),
            (v, PortType::Scalar) => v.is_scalar(),
            (
                Value::Tensor(_) | Value::Latents(_) | Value::Image(_) | Value::Conditioning(_),
                PortType::TensorLike,
            ) => true,
            (Value::Tensor(_), PortType::Tensor) => true,
            (Value::Latents(_), PortType::Latents) => true,
            (Value::Image(_), PortType::Image) => true,
            (Value::Conditioning(_), PortType::Conditioning) => true,
            (Value::Handle(h), ty) => &h.kind == ty,
            _ => false,
        }
    }

    pub fn is_scalar(&self) -> bool {
        matches!(
            self,
            Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::String(_) | Value::Path(_)
        )
    }

    /// Applies the conversions that [`PortType::accepts`] allows, so a node always
    /// receives exactly the type it declared.
    pub fn coerce(self, ty: &PortType) -> Result<Value, Value> {
        if self.matches(ty) {
            return Ok(self);
        }
        match (self, ty) {
            (Value::Int(i), PortType::Float) => Ok(Value::Float(i as f64)),
            (Value::String(s), PortType::Path) => Ok(Value::Path(PathBuf::from(s))),
            (Value::Latents(l), PortType::Tensor) => Ok(Value::Tensor(l.tensor)),
            (Value::List(items), PortType::List(item)) => {
                let mut out = Vec::with_capacity(items.len());
                let mut iter = items.into_iter();
                for v in iter.by_ref() {
                    match v.coerce(item) {
                        Ok(v) => out.push(v),
                        Err(bad) => {
                            out.push(bad);
                            out.extend(iter);
                            return Err(Value::List(out));
                        }
                    }
                }
                Ok(Value::List(out))
            }
            (other, _) => Err(other),
        }
    }

    /// Renders a scalar for string interpolation (`"out/${params.seed}.png"`).
    pub fn to_text(&self) -> Option<String> {
        Some(match self {
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::String(s) => s.clone(),
            Value::Path(p) => p.display().to_string(),
            _ => return None,
        })
    }

    /// Approximate memory held, for the byte-bounded output cache.
    pub fn approx_bytes(&self) -> usize {
        fn tensor_bytes(t: &Tensor) -> usize {
            t.elem_count() * t.dtype().size_in_bytes()
        }
        match self {
            Value::String(s) => s.len() + 24,
            Value::Path(p) => p.as_os_str().len() + 24,
            Value::List(items) => items.iter().map(Value::approx_bytes).sum::<usize>() + 24,
            Value::Tensor(t) | Value::Image(t) => tensor_bytes(t),
            Value::Latents(l) => tensor_bytes(&l.tensor),
            Value::Conditioning(c) => tensor_bytes(&c.embeddings) + tensor_bytes(&c.mask),
            Value::Handle(h) => h.bytes,
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => 8,
        }
    }

    /// Feeds a literal (scalar or list) into a cache-key hasher. Tensors and
    /// handles never come from literals: their identity is their producer's key.
    pub(crate) fn hash_literal(&self, h: &mut blake3::Hasher) {
        match self {
            Value::Int(i) => {
                h.update(b"i");
                h.update(&i.to_le_bytes());
            }
            Value::Float(f) => {
                h.update(b"f");
                h.update(&f.to_bits().to_le_bytes());
            }
            Value::Bool(b) => {
                h.update(if *b { b"T" } else { b"F" });
            }
            Value::String(s) => {
                h.update(b"s");
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            Value::Path(p) => {
                let s = p.to_string_lossy();
                h.update(b"p");
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            Value::List(items) => {
                h.update(b"[");
                h.update(&(items.len() as u64).to_le_bytes());
                for v in items {
                    v.hash_literal(h);
                }
            }
            other => {
                h.update(b"?");
                h.update(other.kind_name().as_bytes());
            }
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// A JSON rendering of scalars and lists, for catalogs and summaries.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Int(i) => J::from(*i),
            Value::Float(f) => J::from(*f),
            Value::Bool(b) => J::from(*b),
            Value::String(s) => J::from(s.as_str()),
            Value::Path(p) => J::from(p.display().to_string()),
            Value::List(items) => J::Array(items.iter().map(Value::to_json).collect()),
            Value::Tensor(t) | Value::Image(t) | Value::Latents(Latents { tensor: t, .. }) => {
                J::from(format!(
                    "{} {:?} {:?}",
                    self.kind_name(),
                    t.dtype(),
                    t.dims()
                ))
            }
            Value::Conditioning(c) => J::from(format!("Conditioning {:?}", c.embeddings.dims())),
            Value::Handle(h) => J::from(format!("{h:?}")),
        }
    }
}

/// Converts a literal written in a workflow (or a declared default) into a value
/// of the port's type. Errors describe what was expected.
pub fn literal_to_value(lit: &serde_json::Value, ty: &PortType) -> Result<Value, String> {
    use serde_json::Value as J;
    let got = || match lit {
        J::Null => "null".to_string(),
        J::Bool(b) => format!("bool {b}"),
        J::Number(n) => format!("number {n}"),
        J::String(s) => format!("string {s:?}"),
        J::Array(_) => "a list".to_string(),
        J::Object(_) => "a mapping".to_string(),
    };
    let mismatch = || Err(format!("expected {ty}, found {}", got()));
    match ty {
        PortType::Int => match lit {
            J::Number(n) => match n.as_i64() {
                Some(i) => Ok(Value::Int(i)),
                None => mismatch(),
            },
            _ => mismatch(),
        },
        PortType::Float => match lit {
            J::Number(n) => n.as_f64().map(Value::Float).ok_or_else(got),
            _ => mismatch(),
        },
        PortType::Bool => match lit {
            J::Bool(b) => Ok(Value::Bool(*b)),
            _ => mismatch(),
        },
        PortType::String => match lit {
            J::String(s) => Ok(Value::String(s.clone())),
            _ => mismatch(),
        },
        PortType::Path => match lit {
            J::String(s) if !s.is_empty() => Ok(Value::Path(PathBuf::from(s))),
            _ => mismatch(),
        },
        PortType::Enum(choices) => match lit {
            J::String(s) if choices.contains(s) => Ok(Value::String(s.clone())),
            J::String(s) => Err(format!(
                "{s:?} is not one of the choices: {}",
                choices.join(", ")
            )),
            _ => mismatch(),
        },
        PortType::Scalar => match lit {
            J::Bool(b) => Ok(Value::Bool(*b)),
            J::Number(n) => Ok(n
                .as_i64()
                .map(Value::Int)
                .unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN)))),
            J::String(s) => Ok(Value::String(s.clone())),
            _ => mismatch(),
        },
        PortType::List(item) => match lit {
            J::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| literal_to_value(v, item).map_err(|e| format!("item {i}: {e}")))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::List),
            _ => mismatch(),
        },
        _ => Err(format!(
            "a {ty} cannot be written as a literal: connect it to a node output"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A lazy handle loads once, for all its clones, on first read; a failure is
    /// what every reader gets; the last-use hook runs when called.
    #[test]
    fn lazy_handles_load_once_on_first_read() {
        let loads = Arc::new(AtomicUsize::new(0));
        let counted = loads.clone();
        let h = Handle::lazy(PortType::Vae, 0, move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(7u32))
        });
        let copy = h.clone();
        assert!(!h.is_resolved());
        assert_eq!(loads.load(Ordering::SeqCst), 0);
        assert_eq!(copy.downcast::<u32>(), Some(&7));
        assert_eq!(h.downcast::<u32>(), Some(&7));
        assert!(h.is_resolved());
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(h.resolve::<String>(), Ok(None), "another type");

        let broken = Handle::lazy::<u32>(PortType::Vae, 0, || Err("no weights".into()));
        assert_eq!(broken.resolve::<u32>(), Err("no weights".to_string()));
        assert_eq!(broken.downcast::<u32>(), None);

        let heard = Arc::new(AtomicUsize::new(0));
        let hook = heard.clone();
        let h = Handle::new(PortType::Vae, 0, 1u8).on_last_use(move || {
            hook.fetch_add(1, Ordering::SeqCst);
        });
        h.clone().last_use();
        assert_eq!(heard.load(Ordering::SeqCst), 1);
    }
}
