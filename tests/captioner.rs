//! The LLaVA captioner against transformers on the tiny random LLaVA that
//! `tests/fixtures/generate_llava.py` builds: processed pixel values, input ids,
//! image features and first-step logits within 1e-4 (relative to the largest
//! reference value), the greedy caption's token ids and text exactly.

mod common;

use pixart_nodes::captioner::{Captioner, Generation};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> (std::collections::HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("reference");
    let tensors =
        pixart_runtime::candle_core::safetensors::load(dir.join("llava.safetensors"), &Device::Cpu)
            .unwrap();
    let json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("llava.json")).unwrap()).unwrap();
    (tensors, json)
}

/// An 8-bit RGB PNG as (bytes, width, height).
fn rgb(path: &Path) -> (Vec<u8>, usize, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (buf, info.width as usize, info.height as usize)
}

#[test]
fn tiny_llava_matches_transformers() {
    let captioner =
        Captioner::load(&fixtures().join("tiny-llava"), DType::F32, &Device::Cpu).unwrap();
    let (tensors, json) = reference();
    let cases = json["cases"].as_array().unwrap();
    let max_tokens = json["max_new_tokens"].as_u64().unwrap() as usize;
    assert_eq!(cases.len(), 3);
    for (i, case) in cases.iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let text = captioner.prompt_text(prompt).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case {i}: chat template"
        );

        let ids = captioner.input_ids(&text).unwrap();
        let want_ids: Vec<u32> = tensors[&format!("input_ids_{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        assert_eq!(ids, want_ids, "case {i}: input ids");

        let (bytes, w, h) = rgb(&fixtures()
            .join("reference")
            .join(case["image"].as_str().unwrap()));
        assert_eq!(
            [w, h],
            [
                case["size"][0].as_u64().unwrap() as usize,
                case["size"][1].as_u64().unwrap() as usize
            ]
        );
        let px = captioner.pixel_values(&bytes, w, h).unwrap();
        let e = common::rel_err(&px, &tensors[&format!("pixel_values_{i}")]);
        assert!(e <= 1e-4, "case {i}: pixel values, relative error {e:e}");

        let features = captioner.image_features(&px).unwrap().squeeze(0).unwrap();
        let e = common::rel_err(&features, &tensors[&format!("image_features_{i}")]);
        assert!(e <= 1e-4, "case {i}: image features, relative error {e:e}");

        let logits = captioner
            .first_logits(&ids, &px)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let e = common::rel_err(&logits, &tensors[&format!("logits_{i}")]);
        assert!(
            e <= 1e-4,
            "case {i}: first-step logits, relative error {e:e}"
        );

        let opts = Generation {
            max_tokens,
            temperature: 0.0,
            seed: 0,
        };
        let caption = captioner
            .caption(&bytes, w, h, prompt, &opts, |_, _| Ok(()))
            .unwrap();
        let want: Vec<u32> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(caption.ids, want, "case {i}: greedy ids");
        assert_eq!(
            caption.text,
            case["caption"].as_str().unwrap(),
            "case {i}: caption text"
        );
        eprintln!(
            "case {i} ({w}×{h}): {} prompt tokens, caption {:?} ({} tokens)",
            ids.len(),
            caption.text,
            caption.ids.len()
        );
    }
    assert!(
        cases.iter().any(|c| c["stopped_at_eos"].as_bool().unwrap()),
        "one fixture case stops at end-of-sequence"
    );
}
