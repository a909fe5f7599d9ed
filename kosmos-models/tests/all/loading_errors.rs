//! `from_pretrained` errors: each names the thing.

use std::path::PathBuf;

use kosmos_core::testing::Fixture;
use kosmos_models::{ConfigError, Kosmos2, Kosmos2Config, Kosmos2Error};

use crate::TB;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-models-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &PathBuf, to: &PathBuf) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load(dir: &PathBuf) -> Result<Kosmos2<TB>, Kosmos2Error> {
    Kosmos2::<TB>::from_pretrained(dir, &Default::default())
}

#[test]
fn missing_directory_config_and_weights_are_named() {
    let err = load(&PathBuf::from("/nonexistent/kosmos-2")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kosmos-2"), "{err}");
    let dir = scratch("empty");
    let err = load(&dir).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::copy(
        Fixture::open("kosmos2/tiny").dir.join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = load(&dir).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn missing_shard_is_named() {
    let dir = scratch("shards");
    copy_dir(&Fixture::open("kosmos2/tiny_sharded").dir, &dir);
    std::fs::remove_file(dir.join("model-00003-of-00005.safetensors")).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(err.to_string().contains("model-00003-of-00005.safetensors"), "{err}");
}

#[test]
fn truncated_weights_and_missing_tensors_are_named() {
    let dir = scratch("truncated");
    copy_dir(&Fixture::open("kosmos2/tiny").dir, &dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(err, Kosmos2Error::Load(kosmos_core::LoadError::Corrupt { .. })),
        "{err:?}"
    );

    // A config that asks for one more layer than the weights have.
    let dir = scratch("extra-layer");
    copy_dir(&Fixture::open("kosmos2/tiny").dir, &dir);
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"layers\": 2", "\"layers\": 3");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load(&dir).unwrap_err();
    match err {
        Kosmos2Error::Load(kosmos_core::LoadError::MissingKey { key, .. }) => {
            assert!(key.contains("layers.2."), "{key}")
        }
        other => panic!("expected MissingKey, got {other:?}"),
    }

    // A config whose width disagrees with the weights.
    let dir = scratch("shape");
    copy_dir(&Fixture::open("kosmos2/tiny").dir, &dir);
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"ffn_dim\": 64", "\"ffn_dim\": 48");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(&err, Kosmos2Error::Load(kosmos_core::LoadError::ShapeMismatch { key, .. }) if key.contains("fc")),
        "{err:?}"
    );
}

#[test]
fn bad_config_values_are_refused_with_field_and_value() {
    let path = std::path::Path::new("config.json");
    let cases = [
        (
            r#"{"text_config": {"embed_dim": 30, "attention_heads": 4}}"#,
            "text_config.embed_dim",
        ),
        (r#"{"text_config": {"layers": 0}}"#, "text_config.layers"),
        (
            r#"{"text_config": {"activation_function": "swish"}}"#,
            "text_config.activation_function",
        ),
        (r#"{"vision_config": {"image_size": 225}}"#, "vision_config.image_size"),
        (r#"{"latent_query_num": 0}"#, "latent_query_num"),
        (
            r#"{"text_config": {"add_cross_attention": true}}"#,
            "text_config.add_cross_attention",
        ),
    ];
    for (json, field) in cases {
        match Kosmos2Config::from_json_str(json, path) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{json}"),
            other => panic!("{json}: expected Invalid({field}), got {other:?}"),
        }
    }
    let err = Kosmos2Config::from_json_str("{\n  \"text_config\": {\"embed_dim\": \"wide\"}\n}", path).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { message, .. } if message.contains("line 2")),
        "{err:?}"
    );
    // Aliases of the reference's JSON.
    let c = Kosmos2Config::from_json_str(
        r#"{"text_config": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8}}"#,
        path,
    )
    .unwrap();
    assert_eq!(
        (
            c.text_config.embed_dim,
            c.text_config.layers,
            c.text_config.attention_heads
        ),
        (64, 3, 8)
    );
}
