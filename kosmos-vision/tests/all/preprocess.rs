//! Image decoding and CLIP preprocessing against transformers' `CLIPImageProcessorPil`
//! (scripts/make_preprocess_fixtures.py), and the bad-input errors.

use burn::prelude::*;
use kosmos_core::testing::Fixture;
use kosmos_vision::preprocess::{CropSize, ImageError, ImageProcessor, ImageProcessorConfig, ResizeTarget, load_rgb};
use kosmos_vision::resize::{Filter, resize_u8};

use crate::TB;

fn processor(mode: &str) -> ImageProcessor {
    let mut c = ImageProcessorConfig::default();
    match mode {
        "square" | "square224" => {
            let side = if mode == "square" { 48 } else { 224 };
            c.size = Some(ResizeTarget::Exact {
                height: side,
                width: side,
            });
            c.do_center_crop = false;
        }
        "shortest_edge" | "shortest224" => {
            let side = if mode == "shortest_edge" { 40 } else { 224 };
            c.size = Some(ResizeTarget::ShortestEdge { shortest_edge: side });
            c.crop_size = Some(CropSize {
                height: side,
                width: side,
            });
            c.do_center_crop = true;
        }
        other => panic!("unknown mode {other}"),
    }
    ImageProcessor::new(c).unwrap()
}

fn u8_of(fx: &Fixture, key: &str) -> Vec<u8> {
    let io = fx.file("io.safetensors");
    let data = io.data(key).unwrap();
    data.convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u8)
        .collect()
}

fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

#[test]
fn decoded_rgb_matches_pil_load_image() {
    let fx = Fixture::open("preprocess");
    for img in fx.meta["images"].as_array().unwrap() {
        let Some(key) = img["loaded_rgb_key"].as_str() else {
            continue;
        };
        let ours = load_rgb(fx.dir.join(img["file"].as_str().unwrap()), u64::MAX).unwrap();
        let [w, h] = [0, 1].map(|i| img["loaded_size_wh"][i].as_u64().unwrap() as usize);
        assert_eq!((ours.width, ours.height), (w, h), "{key}: size after EXIF orientation");
        let diff = max_level_diff(&ours.pixels, &u8_of(&fx, key));
        eprintln!("{key}: max decoded difference {diff} levels");
        // Lossless formats decode exactly; lossy decoders (JPEG IDCT, WebP YUV->RGB) may differ by
        // a level or two from libjpeg-turbo / libwebp.
        let lossy = key.contains("jpg") || key.contains("webp");
        assert!(
            diff <= if lossy { 3 } else { 0 },
            "{key}: decoded pixels differ by {diff} levels"
        );
    }
}

#[test]
fn resized_pixels_match_clip_image_processor_within_one_level() {
    let fx = Fixture::open("preprocess");
    let io = fx.file("io.safetensors");
    let device = Default::default();
    let mut worst_u8 = 0u8;
    let mut worst_norm = 0f32;
    let mut checked = 0;
    for img in fx.meta["images"].as_array().unwrap() {
        let stem = img["stem"].as_str().unwrap();
        let path = fx.dir.join(img["file"].as_str().unwrap());
        for mode in ["square", "shortest_edge", "square224", "shortest224"] {
            let key = format!("{stem}__{mode}__uint8");
            if !io.keys().contains(&key) {
                continue;
            }
            let p = processor(mode);
            let loaded = p.load(&path).unwrap();
            let ours = p.resize_and_crop(&loaded);
            let reference = u8_of(&fx, &key);
            let diff = max_level_diff(&ours.pixels, &reference);
            eprintln!("{key}: max resized difference {diff} levels");
            assert!(diff <= 1, "{key}: resized pixels differ from PIL by {diff} levels");
            worst_u8 = worst_u8.max(diff);
            let pv_key = format!("{stem}__{mode}__pixel_values");
            if io.keys().contains(&pv_key) {
                let ours = p.batch::<TB>(&[loaded], &device).unwrap();
                let reference: Tensor<TB, 3> = io.tensor(&pv_key, &device).unwrap();
                let [c, h, w] = reference.dims();
                let err: f32 = (ours.reshape([c, h, w]) - reference).abs().max().into_scalar();
                // One level is 1 / (255 std) ~ 0.0152 in normalised units.
                assert!(
                    err <= 1.0 / (255.0 * 0.2613) + 1e-5,
                    "{pv_key}: normalised difference {err}"
                );
                worst_norm = worst_norm.max(err);
            }
            checked += 1;
        }
    }
    eprintln!("preprocessing: {checked} cases, worst {worst_u8} levels, worst normalised {worst_norm:.4}");
    assert!(checked >= 20);
}

#[test]
fn resampler_equals_pil_bicubic_on_lossless_input() {
    let fx = Fixture::open("preprocess");
    let src = load_rgb(fx.dir.join("images/rgb_300x200.png"), u64::MAX).unwrap();
    for (w, h) in [(37, 23), (150, 100), (450, 300)] {
        let ours = resize_u8(&src.pixels, src.width, src.height, 3, w, h, Filter::Bicubic);
        let diff = max_level_diff(&ours, &u8_of(&fx, &format!("resize__{w}x{h}")));
        assert_eq!(diff, 0, "resize to {w}x{h} differs from PIL by {diff} levels");
    }
}

#[test]
fn use_square_size_overrides_size_like_the_reference() {
    let c: ImageProcessorConfig =
        serde_json::from_str(r#"{"use_square_size": true, "size": {"shortest_edge": 48}}"#).unwrap();
    assert_eq!(
        c.resize_target(),
        ResizeTarget::Exact {
            height: 224,
            width: 224
        }
    );
    let c: ImageProcessorConfig =
        serde_json::from_str(r#"{"size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}}"#).unwrap();
    assert_eq!(c.resize_target(), ResizeTarget::ShortestEdge { shortest_edge: 48 });
}

fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("kosmos-vision-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A BMP header claiming `w x h` pixels of 24-bit colour, with no pixel data behind it.
fn bmp_header(w: u32, h: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"BM");
    b.extend(&54u32.wrapping_add(w.wrapping_mul(h).wrapping_mul(3)).to_le_bytes());
    b.extend(&[0u8; 4]);
    b.extend(&54u32.to_le_bytes());
    b.extend(&40u32.to_le_bytes());
    b.extend(&w.to_le_bytes());
    b.extend(&h.to_le_bytes());
    b.extend(&1u16.to_le_bytes());
    b.extend(&24u16.to_le_bytes());
    b.extend(&[0u8; 24]);
    b
}

#[test]
fn huge_images_are_refused_before_decoding() {
    let path = temp("huge.bmp", &bmp_header(60_000, 50_000));
    let err = load_rgb(&path, ImageProcessorConfig::DEFAULT_MAX_PIXELS).unwrap_err();
    match &err {
        ImageError::TooLarge { width, height, .. } => assert_eq!((*width, *height), (60_000, 50_000)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(err.to_string().contains("huge.bmp"), "{err}");
    // The limit is configurable and applies to real images too.
    let fx = Fixture::open("preprocess");
    let err = load_rgb(fx.dir.join("images/rgb_300x200.png"), 1000).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                pixels: 60_000,
                limit: 1000,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn unreadable_and_corrupt_files_name_the_file() {
    let err = load_rgb("/nonexistent/cat.png", u64::MAX).unwrap_err();
    assert!(
        matches!(err, ImageError::Io { .. }) && err.to_string().contains("/nonexistent/cat.png"),
        "{err}"
    );
    let fx = Fixture::open("preprocess");
    let bytes = std::fs::read(fx.dir.join("images/rgb_300x200.png")).unwrap();
    let path = temp("truncated.png", &bytes[..bytes.len() / 3]);
    let err = load_rgb(&path, u64::MAX).unwrap_err();
    assert!(
        matches!(err, ImageError::Decode { .. }) && err.to_string().contains("truncated.png"),
        "{err}"
    );
    let path = temp("garbage.jpg", b"this is not an image");
    let err = load_rgb(&path, u64::MAX).unwrap_err();
    assert!(err.to_string().contains("garbage.jpg"), "{err}");
}
