//! CLIP ViT and the KOSMOS-2 projection against HF transformers (scripts/make_vision_fixtures.py).

use burn::prelude::*;
use kosmos_core::load_safetensors;
use kosmos_core::loader::{HF_CLIP_VISION, HF_KOSMOS2_PROJECTION, KeyMap};
use kosmos_core::testing::{ATOL, Fixture, RTOL, assert_close};
use kosmos_core::{Activation, AttentionImpl};
use kosmos_vision::{ClipVisionConfig, ClipVisionModel, ImageToTextProjection, ImageToTextProjectionConfig};

use crate::TB;

fn clip_config(c: &serde_json::Value) -> ClipVisionConfig {
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    ClipVisionConfig::new(
        u("hidden_size"),
        u("intermediate_size"),
        u("num_hidden_layers"),
        u("num_attention_heads"),
        u("image_size"),
        u("patch_size"),
    )
    .with_hidden_act(Activation::from_name(c["hidden_act"].as_str().unwrap()).unwrap())
    .with_layer_norm_eps(c["layer_norm_eps"].as_f64().unwrap())
}

fn load_clip<B: Backend>(
    fx: &Fixture,
    config: ClipVisionConfig,
    map: &KeyMap,
    device: &B::Device,
) -> ClipVisionModel<B> {
    let mut model = config.init::<B>(device);
    load_safetensors(&mut model, fx.dir.join("weights.safetensors"), map).unwrap();
    model
}

fn check_clip(case: &str, implementation: AttentionImpl) {
    let fx = Fixture::open(&format!("vision/{case}"));
    let device = Default::default();
    let model = load_clip::<TB>(
        &fx,
        clip_config(&fx.meta["config"]).with_attention_impl(implementation),
        &HF_CLIP_VISION,
        &device,
    );
    let io = fx.file("io.safetensors");
    let what = |s: &str| format!("{case} {implementation:?} {s}");
    let pixels: Tensor<TB, 4> = io.tensor("pixel_values", &device).unwrap();
    let out = model.forward(pixels.clone(), false);
    assert_close(
        out.last_hidden_state,
        io.tensor("last_hidden_state", &device).unwrap(),
        ATOL,
        RTOL,
        &what("last_hidden_state"),
    );
    assert_close(
        out.pooler_output,
        io.tensor("pooler_output", &device).unwrap(),
        ATOL,
        RTOL,
        &what("pooler_output"),
    );
    assert_close(
        model.image_features(pixels, false),
        io.tensor("image_features", &device).unwrap(),
        ATOL,
        RTOL,
        &what("image_features"),
    );
    if io.keys().iter().any(|k| k == "pixel_values_interp") {
        let pixels: Tensor<TB, 4> = io.tensor("pixel_values_interp", &device).unwrap();
        let out = model.forward(pixels.clone(), true);
        assert_close(
            out.last_hidden_state,
            io.tensor("last_hidden_state_interp", &device).unwrap(),
            ATOL,
            RTOL,
            &what("interpolated last_hidden_state"),
        );
        assert_close(
            out.pooler_output,
            io.tensor("pooler_output_interp", &device).unwrap(),
            ATOL,
            RTOL,
            &what("interpolated pooler_output"),
        );
        assert_close(
            model.image_features(pixels, true),
            io.tensor("image_features_interp", &device).unwrap(),
            ATOL,
            RTOL,
            &what("interpolated image_features"),
        );
    }
}

#[test]
fn clip_patch14_matches_transformers() {
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        check_clip("clip_p14", imp);
    }
}

#[test]
fn clip_patch8_matches_transformers() {
    for imp in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        check_clip("clip_p8", imp);
    }
}

fn projection_config(vision: usize, fx: &Fixture, text_key: &str, heads_key: &str) -> ImageToTextProjectionConfig {
    ImageToTextProjectionConfig::new(vision, fx.config_usize(text_key), fx.config_usize(heads_key))
        .with_latent_query_num(fx.config_usize("latent_query_num"))
}

#[test]
fn kosmos2_projection_matches_transformers() {
    let fx = Fixture::open("vision/kosmos2_projection");
    let device = Default::default();
    let mut proj: ImageToTextProjection<TB> = projection_config(
        fx.config_usize("vision_hidden_size"),
        &fx,
        "embed_dim",
        "attention_heads",
    )
    .init(&device);
    load_safetensors(&mut proj, fx.dir.join("weights.safetensors"), &HF_KOSMOS2_PROJECTION).unwrap();
    let io = fx.file("io.safetensors");
    let out = proj.forward(io.tensor("features", &device).unwrap());
    assert_close(
        out,
        io.tensor("image_embeds", &device).unwrap(),
        ATOL,
        RTOL,
        "kosmos2 projection image_embeds",
    );
}

/// The vision half of a KOSMOS-2 checkpoint (HF key layout), as `get_image_features` runs it.
const KOSMOS2_VISION_ONLY: KeyMap = KeyMap {
    rename: &[(r"^vision_model\.model\.", "")],
    ignore: &[r"^image_to_text_projection\.", r"^text_model\."],
};
const KOSMOS2_PROJECTION_ONLY: KeyMap = KeyMap {
    rename: &[(r"^image_to_text_projection\.", "")],
    ignore: &[r"^vision_model\.", r"^text_model\."],
};

#[test]
fn kosmos2_image_features_and_embeddings_match_transformers() {
    let fx = Fixture::open("vision/kosmos2_image_features");
    let device = Default::default();
    let vision_cfg = clip_config(&fx.meta["config"]["vision_config"]);
    let vision_hidden = vision_cfg.hidden_size;
    let clip = load_clip::<TB>(&fx, vision_cfg, &KOSMOS2_VISION_ONLY, &device);
    let mut proj: ImageToTextProjection<TB> =
        projection_config(vision_hidden, &fx, "text_embed_dim", "text_attention_heads").init(&device);
    load_safetensors(&mut proj, fx.dir.join("weights.safetensors"), &KOSMOS2_PROJECTION_ONLY).unwrap();
    let io = fx.file("io.safetensors");
    let pixels: Tensor<TB, 4> = io.tensor("pixel_values", &device).unwrap();
    let features = clip.image_features(pixels, false);
    assert_close(
        features.clone(),
        io.tensor("image_features", &device).unwrap(),
        ATOL,
        RTOL,
        "kosmos2 image features",
    );
    assert_close(
        proj.forward(features),
        io.tensor("image_embeds", &device).unwrap(),
        ATOL,
        RTOL,
        "kosmos2 image embeds",
    );
}

#[test]
fn vit_l14_parameter_count_is_the_known_one() {
    assert_eq!(ClipVisionConfig::vit_l14_224().num_params(), 303_179_776);
    assert_eq!(ImageToTextProjectionConfig::kosmos2().num_params(), 19_015_680);
}
