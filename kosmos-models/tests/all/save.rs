//! Saving in Hugging Face's layout: the file holds exactly the keys, shapes and dtypes of the
//! checkpoint transformers wrote (`fixtures/kosmos2/tiny/model.safetensors`, made by its
//! `save_pretrained`), with the same values, and loads back to the same logits.

use burn::prelude::*;
use kosmos_core::TensorFile;
use kosmos_core::testing::Fixture;
use kosmos_models::Kosmos2;

use crate::TB;

#[test]
fn save_pretrained_writes_transformers_layout_and_round_trips() {
    let device = Default::default();
    let fx = Fixture::open("kosmos2/tiny");
    let model = Kosmos2::<TB>::from_pretrained(&fx.dir, &device).unwrap();
    let out = std::env::temp_dir().join(format!("kosmos-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    model.save_pretrained(&out, &fx.dir).unwrap();

    // Same keys, shapes, dtypes and values as transformers' own file.
    let ours = TensorFile::open(out.join("model.safetensors")).unwrap();
    let theirs = TensorFile::open(fx.dir.join("model.safetensors")).unwrap();
    let mut ours_keys = ours.keys();
    let mut their_keys = theirs.keys();
    ours_keys.sort();
    their_keys.sort();
    assert_eq!(ours_keys, their_keys);
    for key in &their_keys {
        let (a, b) = (ours.data(key).unwrap(), theirs.data(key).unwrap());
        assert_eq!(a.shape, b.shape, "{key}");
        assert_eq!(a.dtype, b.dtype, "{key}");
        assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "{key}");
    }
    assert!(out.join("config.json").is_file());
    // No temporary file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());

    // Reloaded, it computes the same logits.
    let reloaded = Kosmos2::<TB>::from_pretrained(&out, &device).unwrap();
    let ids = Tensor::<TB, 2, Int>::from_ints([[0, 5, 9, 3, 2]], &device);
    let hidden_a = model.text_hidden(&ids, None, None, None).unwrap();
    let hidden_b = reloaded.text_hidden(&ids, None, None, None).unwrap();
    let (a, b) = (model.logits(hidden_a), reloaded.logits(hidden_b));
    assert_eq!(a.into_data(), b.into_data());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn saving_into_a_missing_place_is_an_error_naming_it() {
    let device = Default::default();
    let fx = Fixture::open("kosmos2/tiny");
    let model = Kosmos2::<TB>::from_pretrained(&fx.dir, &device).unwrap();
    let file = std::env::temp_dir().join(format!("kosmos-save-file-{}", std::process::id()));
    std::fs::write(&file, "x").unwrap();
    // A regular file where the directory should be.
    let err = model
        .save_pretrained(file.join("sub"), &fx.dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kosmos-save-file"), "{err}");
    std::fs::remove_file(&file).unwrap();
}
