//! The text encoder as nodes pass it around: a slot that loads T5 when a node
//! first encodes, and can let the weights go once a run has encoded its
//! prompts — what diffusers users do on small machines (`del pipe.text_encoder`
//! after `encode_prompt`): T5-XXL is 19 GB in f32, the transformer 2.4 GB. A
//! released slot loads the weights again when a later run encodes.

use super::load;
use crate::device::TextWeights;
use candle_core::{DType, Device};
use pixart_models::t5::T5Encoder;
use pixart_models::weights::LoadError;
use pixart_runtime::{Handle, Inputs, NodeError, PortType, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct TextEncoder {
    dir: PathBuf,
    dtype: DType,
    weights: TextWeights,
    device: Device,
    /// Let the weights go when the run that loaded them is done with them.
    release_after_use: bool,
    model: Mutex<Option<Arc<T5Encoder>>>,
}

impl TextEncoder {
    /// The encoder in `dir` (through the model cache): loaded now, or with
    /// `low_memory` by the first [`TextEncoder::get`] and released after the
    /// run's last reader (its configuration is read now either way).
    pub fn load(
        dir: &Path,
        dtype: DType,
        weights: TextWeights,
        device: &Device,
        low_memory: bool,
    ) -> Result<TextEncoder, LoadError> {
        load::check_text_weights(dir, dtype, weights, device)?;
        // Configuration errors show at the loader even when the weights wait.
        let _: pixart_models::t5::Config = pixart_models::weights::read_config(dir)?;
        let encoder = TextEncoder {
            dir: dir.to_path_buf(),
            dtype,
            weights,
            device: device.clone(),
            release_after_use: low_memory,
            model: Mutex::new(None),
        };
        if !low_memory {
            encoder.get()?;
        }
        Ok(encoder)
    }

    /// The loaded encoder, loaded again if it was released. A releasing slot
    /// reads the folder itself: the shared model cache would keep the weights
    /// alive (and other runs' slots rely on it).
    pub fn get(&self) -> Result<Arc<T5Encoder>, LoadError> {
        let mut slot = self.model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = &*slot {
            return Ok(model.clone());
        }
        let model = if self.release_after_use {
            let (model, _) =
                load::read_text_encoder(&self.dir, self.dtype, self.weights, &self.device)?;
            Arc::new(model)
        } else {
            load::text_encoder(&self.dir, self.dtype, self.weights, &self.device)?
        };
        *slot = Some(model.clone());
        Ok(model)
    }

    /// Drops the slot's weights; encodes in progress keep theirs until they
    /// finish.
    pub fn release(&self) {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn is_loaded(&self) -> bool {
        self.model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The node output: a handle that releases the weights after the run's last
    /// reader when asked to.
    pub fn into_value(self) -> Value {
        let release = self.release_after_use;
        let encoder = Arc::new(self);
        let handle = Handle::shared(PortType::TextEncoder, 0, encoder.clone());
        Value::Handle(if release {
            handle.on_last_use(move || encoder.release())
        } else {
            handle
        })
    }
}

/// The T5 on input `name`, loaded again if a run before released it.
pub fn from_input(inputs: &Inputs, name: &str) -> Result<Arc<T5Encoder>, NodeError> {
    inputs
        .handle::<TextEncoder>(name)?
        .get()
        .map_err(|e| NodeError::input(name, e.to_string()))
}
