//! MAGNETO initialisation and parameter counts against torchscale.

use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use kosmos_core::DecoderConfig;
use kosmos_core::presets::LanguageModelPreset;

use crate::common::{Fixture, TB};

#[test]
fn magneto_init_scale_and_distributions_match_torchscale() {
    let fx = Fixture::open("decoder/magneto_init");
    let config = DecoderConfig::new(
        fx.config_usize("embed_dim"),
        fx.config_usize("layers"),
        fx.config_usize("attention_heads"),
        fx.config_usize("ffn_dim"),
    );
    let expected_scale = fx.meta["init_scale"].as_f64().unwrap();
    assert!((config.magneto_init_scale() - expected_scale).abs() < 1e-12);

    let decoder = config.init_magneto::<TB>(&Default::default());
    let ours: std::collections::BTreeMap<String, Vec<f32>> = decoder
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|s| {
            (
                s.full_path(),
                s.to_data().unwrap().convert::<f32>().to_vec::<f32>().unwrap(),
            )
        })
        .collect();
    let reference = fx.meta["params"].as_array().unwrap();
    assert_eq!(ours.len(), reference.len(), "same parameter set as torchscale");
    for p in reference {
        let name = p["name"].as_str().unwrap();
        let values = ours.get(name).unwrap_or_else(|| panic!("no parameter {name}"));
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let max_abs = values.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let (ref_std, ref_mean, ref_max) = (
            p["std"].as_f64().unwrap(),
            p["mean"].as_f64().unwrap(),
            p["max_abs"].as_f64().unwrap(),
        );
        if ref_std == 0.0 {
            // LayerNorm: exact ones / zeros.
            assert_eq!(std, 0.0, "{name}");
            assert!((mean - ref_mean).abs() < 1e-12, "{name}: mean {mean} vs {ref_mean}");
            continue;
        }
        // Both are uniform draws; the sample std of n uniform values has relative standard error
        // sqrt(0.8 / (4 n)). Allow 6 of those for each side.
        let tol = 12.0 * (0.8 / (4.0 * n)).sqrt();
        assert!(
            (std / ref_std - 1.0).abs() < tol,
            "{name}: std {std} vs torchscale {ref_std} (tol {tol})"
        );
        // Same support: the largest magnitude approaches the same bound from below.
        assert!(
            max_abs <= ref_max * (1.0 + 10.0 / n) + 1e-7 && max_abs > ref_max * (1.0 - 20.0 / n.sqrt()),
            "{name}: max |w| {max_abs} vs {ref_max}"
        );
    }
}

#[test]
fn kosmos1_paper_size_param_count_matches_torchscale() {
    let fx = Fixture::open("decoder/param_count");
    let preset = LanguageModelPreset::kosmos1();
    let cfg = &fx.meta["config"];
    assert_eq!(preset.decoder.layers, fx.config_usize("layers"));
    assert_eq!(preset.decoder.embed_dim, fx.config_usize("embed_dim"));
    assert_eq!(preset.decoder.attention_heads, fx.config_usize("attention_heads"));
    assert_eq!(preset.decoder.ffn_dim, fx.config_usize("ffn_dim"));
    assert_eq!(
        preset.decoder.xpos_scale_base,
        Some(cfg["xpos_scale_base"].as_f64().unwrap())
    );
    assert_eq!(preset.vocab_size, fx.config_usize("vocab_size"));
    assert_eq!(
        preset.decoder.num_params() as u64,
        fx.meta["param_count_layers"].as_u64().unwrap() + fx.meta["param_count_final_layer_norm"].as_u64().unwrap()
    );
    assert_eq!(
        preset.num_params() as u64,
        fx.meta["param_count_total"].as_u64().unwrap()
    );
}
