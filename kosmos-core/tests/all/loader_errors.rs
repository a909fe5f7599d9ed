//! Typed, named errors from the weight loader.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kosmos_core::loader::TORCHSCALE_DECODER;
use kosmos_core::{DecoderConfig, LoadError, load_safetensors};
use safetensors::tensor::{Dtype, TensorView};

use crate::common::{Fixture, TB};

fn tiny() -> kosmos_core::Decoder<TB> {
    DecoderConfig::new(32, 1, 4, 64)
        .with_final_layer_norm(false)
        .init(&Default::default())
}

/// The `layer_noxpos` fixture's tensors as (shape, raw little-endian f32 bytes).
fn fixture_tensors() -> (PathBuf, BTreeMap<String, (Vec<usize>, Vec<u8>)>) {
    let fx = Fixture::open("decoder/layer_noxpos");
    let path = fx.dir.join("weights.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let map = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    (path, map)
}

fn write(name: &str, tensors: &BTreeMap<String, (Vec<usize>, Vec<u8>)>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-loader-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| (k.clone(), TensorView::new(Dtype::F32, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn the_fixture_loads_and_ignores_nothing_unexpected() {
    let (path, _) = fixture_tensors();
    let report = load_safetensors(&mut tiny(), &path, &TORCHSCALE_DECODER).unwrap();
    assert_eq!(report.applied.len(), 20);
    assert!(report.ignored.is_empty());
}

#[test]
fn missing_file_names_the_path() {
    let err = load_safetensors(&mut tiny(), "/nonexistent/weights.safetensors", &TORCHSCALE_DECODER).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/weights.safetensors"));
}

#[test]
fn truncated_file_is_reported_as_corrupt() {
    let (path, _) = fixture_tensors();
    let bytes = std::fs::read(&path).unwrap();
    let cut = std::env::temp_dir().join(format!("kosmos-truncated-{}.safetensors", std::process::id()));
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_safetensors(&mut tiny(), &cut, &TORCHSCALE_DECODER).unwrap_err();
    assert!(matches!(err, LoadError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("kosmos-truncated"), "{err}");
    std::fs::write(&cut, b"not a safetensors file at all").unwrap();
    assert!(matches!(
        load_safetensors(&mut tiny(), &cut, &TORCHSCALE_DECODER),
        Err(LoadError::Corrupt { .. })
    ));
}

#[test]
fn missing_tensor_is_named() {
    let (_, mut tensors) = fixture_tensors();
    tensors.remove("layers.0.ffn.fc2.weight");
    tensors.remove("layers.0.self_attn_layer_norm.weight");
    let path = write("missing.safetensors", &tensors);
    let err = load_safetensors(&mut tiny(), &path, &TORCHSCALE_DECODER).unwrap_err();
    match &err {
        LoadError::MissingKey { key, .. } => {
            assert!(
                key == "layers.0.ffn.fc2.weight" || key == "layers.0.self_attn_layer_norm.weight",
                "{key}"
            )
        }
        other => panic!("expected MissingKey, got {other:?}"),
    }
}

#[test]
fn shape_mismatch_names_key_expected_and_found() {
    let (_, mut tensors) = fixture_tensors();
    // fc1 is [64, 32] (out, in); store a [48, 32] one.
    tensors.insert("layers.0.ffn.fc1.weight".into(), (vec![48, 32], vec![0u8; 48 * 32 * 4]));
    let path = write("shape.safetensors", &tensors);
    let err = load_safetensors(&mut tiny(), &path, &TORCHSCALE_DECODER).unwrap_err();
    match &err {
        LoadError::ShapeMismatch {
            key, expected, found, ..
        } => {
            assert_eq!(key, "layers.0.ffn.fc1.weight");
            assert_eq!(expected, &vec![64, 32]);
            assert_eq!(found, &vec![48, 32]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert!(
        err.to_string().contains("[48, 32]") && err.to_string().contains("[64, 32]"),
        "{err}"
    );
}

#[test]
fn tensors_for_another_model_are_refused() {
    let (_, mut tensors) = fixture_tensors();
    tensors.insert("vision_model.something.weight".into(), (vec![2], vec![0u8; 8]));
    let path = write("extra.safetensors", &tensors);
    let err = load_safetensors(&mut tiny(), &path, &TORCHSCALE_DECODER).unwrap_err();
    assert!(
        matches!(&err, LoadError::UnusedKeys { count: 1, examples, .. } if examples[0] == "vision_model.something.weight"),
        "{err:?}"
    );
}
