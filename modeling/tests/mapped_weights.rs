//! Weights kept in their mapped files: read back equal to what was written,
//! each kept tensor a view of the file, the file unmapped once the last tensor
//! over it is gone, and a mapped vector that grows copied out first.
//!
//! One test function: the count of live mappings is process-wide.

use candle_core::{DType, Device, Tensor};
use pixart_models::mapped::{self, MappedAware};
use pixart_models::weights::{Keep, Weights};
use std::collections::HashMap;

#[global_allocator]
// SAFETY: the global allocator.
static ALLOCATOR: MappedAware<std::alloc::System> = unsafe { MappedAware::new(std::alloc::System) };

/// The values of `t`, widened to f32 (exactly, from every dtype used here).
fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .unwrap()
}

fn data_ptr(t: &Tensor) -> *const u8 {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        panic!("not on the CPU")
    };
    let start = layout.start_offset();
    match cpu {
        candle_core::CpuStorage::F32(v) => v[start..].as_ptr().cast(),
        candle_core::CpuStorage::BF16(v) => v[start..].as_ptr().cast(),
        candle_core::CpuStorage::F16(v) => v[start..].as_ptr().cast(),
        _ => panic!("not a float tensor"),
    }
}

#[test]
fn weights_stay_in_their_mapped_files() {
    if std::env::var("PIXART_MAP_WEIGHTS").is_ok_and(|v| v == "0") {
        eprintln!("PIXART_MAP_WEIGHTS=0: nothing is mapped, nothing to test");
        return;
    }
    // SAFETY: this binary's allocator is MappedAware.
    unsafe { mapped::enable() };
    assert!(mapped::enabled());
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("pixart-mapped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = Tensor::arange(0f32, 96., &dev)
        .unwrap()
        .reshape((8, 12))
        .unwrap();
    let odd = Tensor::arange(0f32, 3., &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let bias = (Tensor::arange(0f32, 8., &dev).unwrap() * 0.5).unwrap();
    let tensors: HashMap<String, Tensor> = [
        ("a.odd".to_string(), odd.clone()),
        ("b.weight".to_string(), w.clone()),
        ("c.bias".to_string(), bias.clone()),
        ("d.transposed".to_string(), w.clone()),
        ("e.narrowed".to_string(), w.clone()),
    ]
    .into();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    assert_eq!(mapped::mappings_alive(), 0);
    let loaded =
        Weights::from_folder_choosing(&dir, &["model"], DType::F32, &dev, |name, stored| Keep {
            dtype: if name == "e.narrowed" {
                DType::BF16
            } else if name == "a.odd" {
                stored
            } else {
                DType::F32
            },
            transposed: name == "d.transposed",
        })
        .unwrap();
    // Every tensor equals what was written, mapped or read.
    assert_eq!(values(loaded.get("a.odd").unwrap()), values(&odd));
    assert_eq!(values(loaded.get("b.weight").unwrap()), values(&w));
    assert_eq!(values(loaded.get("c.bias").unwrap()), values(&bias));
    assert_eq!(
        values(loaded.get("d.transposed").unwrap()),
        values(&w.t().unwrap())
    );
    assert_eq!(values(loaded.get("e.narrowed").unwrap()), values(&w));
    // Kept as stored: a view of the file; converted: memory of its own.
    let weight = loaded.get("b.weight").unwrap();
    assert!(mapped::is_mapped(data_ptr(weight)));
    assert!(mapped::is_mapped(data_ptr(loaded.get("c.bias").unwrap())));
    assert!(mapped::is_mapped(data_ptr(loaded.get("a.odd").unwrap())));
    assert!(!mapped::is_mapped(data_ptr(
        loaded.get("d.transposed").unwrap()
    )));
    assert!(!mapped::is_mapped(data_ptr(
        loaded.get("e.narrowed").unwrap()
    )));
    assert_eq!(mapped::mappings_alive(), 1);
    // Ops on mapped tensors make tensors of their own.
    let sum = (weight + 1.0).unwrap();
    assert!(!mapped::is_mapped(data_ptr(&sum)));
    drop(loaded);
    assert_eq!(
        mapped::mappings_alive(),
        0,
        "the file stays mapped after its tensors are gone"
    );

    // A mapped vector that grows is copied out first (the allocator's realloc).
    let file = std::fs::File::open(dir.join("model.safetensors")).unwrap();
    let len = file.metadata().unwrap().len();
    let mapping = mapped::Mapping::new(&file, len).unwrap();
    let mut bytes: Vec<u8> = mapping.vec(0, 8).unwrap();
    let header: Vec<u8> = std::fs::read(dir.join("model.safetensors")).unwrap()[..8].to_vec();
    assert_eq!(bytes, header);
    // Elements off their alignment are not handed out (the reader reads them).
    assert!(mapping.vec::<f32>(2, 1).is_none());
    assert!(
        mapping.vec::<u8>(len as usize - 1, 2).is_none(),
        "past the end"
    );
    assert!(mapped::is_mapped(bytes.as_ptr()));
    drop(mapping);
    assert_eq!(
        mapped::mappings_alive(),
        1,
        "the vector keeps the file mapped"
    );
    bytes.extend_from_slice(&[1, 2, 3]);
    assert!(!mapped::is_mapped(bytes.as_ptr()));
    assert_eq!(&bytes[..8], &header[..]);
    assert_eq!(&bytes[8..], &[1, 2, 3]);
    assert_eq!(mapped::mappings_alive(), 0);
    drop(bytes);
    std::fs::remove_dir_all(&dir).unwrap();
}
