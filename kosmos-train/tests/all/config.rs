//! `DataConfig` from TOML, with defaults, relative paths and validation.

use std::path::Path;

use kosmos_train::data::{DataConfig, DataError, OnError, Overflow, SourceFormat, SourceKind};

#[test]
fn data_config_from_toml() {
    let text = r#"
        seed = 1234
        max_len = 512
        packing = true
        on_error = "skip"

        [[sources]]
        name = "grit"
        kind = "grit"
        format = "tar"
        paths = ["grit/00000.tar"]
        weight = 3.0
        grit = { score_threshold = 0.5, use_ref_exps = true }

        [[sources]]
        name = "text"
        kind = "text"
        paths = ["text"]
        image_root = "images"
        on_error = "fail"
    "#;
    let mut config: DataConfig = toml::from_str(text).unwrap();
    config.validate().unwrap();
    assert_eq!(config.seed, 1234);
    assert_eq!(config.overflow, Overflow::Truncate);
    assert!(config.add_eos && config.packing && !config.pad_to_max_len);
    assert_eq!(config.on_error, OnError::Skip);
    let grit = &config.sources[0];
    assert_eq!(
        (grit.kind, grit.format, grit.weight),
        (SourceKind::Grit, SourceFormat::Tar, 3.0)
    );
    assert!(grit.grit.use_ref_exps && grit.grit.grounding_prefix);
    assert_eq!(grit.grit.score_threshold, 0.5);
    let t = &config.sources[1];
    assert_eq!(
        (t.format, t.weight, t.on_error),
        (SourceFormat::Jsonl, 1.0, Some(OnError::Fail))
    );
    config.resolve_relative_to(Path::new("/data"));
    assert_eq!(config.sources[0].paths[0], Path::new("/data/grit/00000.tar"));
    assert_eq!(config.sources[1].image_root.as_deref(), Some(Path::new("/data/images")));
}

#[test]
fn bad_configs_are_refused() {
    assert!(toml::from_str::<DataConfig>("[[sources]]\nname = \"x\"\nkind = \"video\"\npaths = []").is_err());
    assert!(toml::from_str::<DataConfig>("typo = 1\nsources = []").is_err());
    let dup = r#"
        [[sources]]
        name = "x"
        kind = "text"
        paths = ["a"]
        [[sources]]
        name = "x"
        kind = "text"
        paths = ["b"]
        weight = -1
    "#;
    let config: DataConfig = toml::from_str(dup).unwrap();
    assert!(matches!(config.validate(), Err(DataError::Config(m)) if m.contains("two sources are named `x`")));
}
