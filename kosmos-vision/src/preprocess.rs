//! CLIP image preprocessing, equal to HF transformers' `CLIPImageProcessor` (PIL backend) as the
//! KOSMOS-2 processor drives it.
//!
//! Steps, as the reference does them when given a file path (`transformers.image_utils.load_image`
//! then the processor):
//!
//! 1. decode (PNG, JPEG, WebP, GIF first frame, BMP) and apply the EXIF orientation; JPEG goes
//!    through libjpeg-turbo's decoder (as PIL's) so that decoded pixels are identical;
//! 2. convert to RGB as PIL's `convert("RGB")` does: alpha dropped (no compositing), grey replicated,
//!    16-bit grey *clipped* to 255 (not scaled), palette entries expanded; a palette image with one
//!    transparent entry has every pixel of that entry's colour turned white (the processor's
//!    `convert_to_rgb` composites PIL's colour-key transparency onto white);
//! 3. resize with PIL's antialiased bicubic ([`crate::resize`]) either to a fixed `height x width`
//!    (KOSMOS-2's `use_square_size` squash) or so that the shortest edge has a given length (long
//!    edge `int(S * long / short)`), then centre-crop (`top = (H - h) / 2`, `left = (W - w) / 2`);
//! 4. rescale by 1/255, normalise with the CLIP mean and std, lay out as `[3, H, W]`.
//!
//! Settings come from the model directory's `preprocessor_config.json`.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use serde::Deserialize;

use crate::resize::{Filter, resize_u8};

/// CLIP's normalisation mean.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's normalisation standard deviation.
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Why an image could not be prepared. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read image `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a supported, well-formed image.
    #[error("cannot decode image `{path}`: {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// The image is larger than the configured pixel limit (checked from the header, before
    /// decoding).
    #[error("image `{path}` is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Width claimed by the header.
        width: u32,
        /// Height claimed by the header.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// The limit.
        limit: u64,
    },
    /// A bad processor configuration.
    #[error("invalid image processor configuration: {0}")]
    Config(String),
}

/// An 8-bit RGB image, row-major, interleaved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub pixels: Vec<u8>,
}

/// Target size of the resize step (HF's `size` dictionary).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ResizeTarget {
    /// Squash to exactly this size.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
    /// Scale so the shortest edge has this length, keeping the aspect ratio.
    ShortestEdge {
        /// Length of the shorter side.
        shortest_edge: usize,
    },
}

/// Centre-crop size (HF's `crop_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct CropSize {
    /// Crop height.
    pub height: usize,
    /// Crop width.
    pub width: usize,
}

fn default_true() -> bool {
    true
}

fn default_rescale() -> f64 {
    1.0 / 255.0
}

fn default_resample() -> u32 {
    3
}

fn default_max_pixels() -> u64 {
    ImageProcessorConfig::DEFAULT_MAX_PIXELS
}

/// The settings of `preprocessor_config.json` that CLIP preprocessing uses (unknown fields are
/// ignored), with `CLIPImageProcessor`'s defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageProcessorConfig {
    /// Resize at all.
    #[serde(default = "default_true")]
    pub do_resize: bool,
    /// Resize target; `None` = shortest edge 224.
    #[serde(default)]
    pub size: Option<ResizeTarget>,
    /// PIL resample filter id (3 = bicubic, 2 = bilinear).
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// Centre-crop after resizing.
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    /// Crop size; `None` = 224 x 224.
    #[serde(default)]
    pub crop_size: Option<CropSize>,
    /// Multiply by `rescale_factor`.
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    /// Rescale factor (1/255).
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    /// Normalise with mean and std.
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default)]
    pub image_mean: Option<[f32; 3]>,
    /// Per-channel standard deviation.
    #[serde(default)]
    pub image_std: Option<[f32; 3]>,
    /// KOSMOS-2's backward-compatibility flag: when true the resize target becomes 224 x 224
    /// (the class default), overriding `size`, as `CLIPImageProcessor.__init__` does.
    #[serde(default)]
    pub use_square_size: bool,
    /// Largest accepted image, in pixels (not an HF field).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

impl ImageProcessorConfig {
    /// Default pixel limit: 64 megapixels.
    pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

    /// Parse a `preprocessor_config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| ImageError::Config(format!("{}: {e}", path.display())))
    }

    /// The effective resize target (after `use_square_size`).
    pub fn resize_target(&self) -> ResizeTarget {
        if self.use_square_size {
            return ResizeTarget::Exact {
                height: 224,
                width: 224,
            };
        }
        self.size
            .clone()
            .unwrap_or(ResizeTarget::ShortestEdge { shortest_edge: 224 })
    }

    fn filter(&self) -> Result<Filter, ImageError> {
        match self.resample {
            3 => Ok(Filter::Bicubic),
            2 => Ok(Filter::Bilinear),
            other => Err(ImageError::Config(format!(
                "resample filter {other} is not supported (2 or 3)"
            ))),
        }
    }
}

/// Decode an image file into RGB as the reference's `load_image` + `convert_to_rgb` do.
pub fn load_rgb(path: impl AsRef<Path>, max_pixels: u64) -> Result<RgbImage, ImageError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb(&bytes, path, max_pixels)
}

/// Decode image bytes (named `path` in errors) into RGB; see [`load_rgb`].
pub fn decode_rgb(bytes: &[u8], path: &Path, max_pixels: u64) -> Result<RgbImage, ImageError> {
    let decode_err = |e: image::ImageError| ImageError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    check_size(reader_dims(bytes)?, path, max_pixels)?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(1 << 20));
    let mut reader = reader;
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let (w, h) = decoder.dimensions();
    check_size((w, h), path, max_pixels)?;
    let orientation = decoder.orientation().map_err(decode_err)?;
    let mut img = if bytes.starts_with(&[0xFF, 0xD8]) {
        drop(decoder);
        decode_jpeg(bytes).map_err(|message| ImageError::Decode {
            path: path.to_path_buf(),
            message,
        })?
    } else {
        DynamicImage::from_decoder(decoder).map_err(decode_err)?
    };
    img.apply_orientation(orientation);
    Ok(to_rgb(img, is_indexed_png(bytes)))
}

/// JPEG with libjpeg-turbo's decoder and its defaults (ISLOW IDCT, fancy upsampling), as PIL.
fn decode_jpeg(bytes: &[u8]) -> Result<DynamicImage, String> {
    let run = || -> std::io::Result<DynamicImage> {
        let decompress = mozjpeg::Decompress::new_mem(bytes)?;
        let grey = decompress.color_space() == mozjpeg::ColorSpace::JCS_GRAYSCALE;
        let (w, h) = (decompress.width() as u32, decompress.height() as u32);
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "pixel count does not match the size");
        if grey {
            let mut started = decompress.grayscale()?;
            let pixels = started.read_scanlines::<u8>()?;
            started.finish()?;
            image::GrayImage::from_raw(w, h, pixels)
                .map(DynamicImage::ImageLuma8)
                .ok_or_else(invalid)
        } else {
            let mut started = decompress.rgb()?;
            let pixels = started.read_scanlines::<u8>()?;
            started.finish()?;
            image::RgbImage::from_raw(w, h, pixels)
                .map(DynamicImage::ImageRgb8)
                .ok_or_else(invalid)
        }
    };
    // libjpeg reports fatal errors by unwinding; keep them as errors.
    match std::panic::catch_unwind(run) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "corrupt JPEG data".into())),
    }
}

/// Width and height from the header only.
fn reader_dims(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    match reader.map(|r| r.into_dimensions()) {
        Ok(Ok(d)) => Ok(d),
        // Let the full decoder produce the descriptive error.
        _ => Ok((0, 0)),
    }
}

fn check_size((width, height): (u32, u32), path: &Path, limit: u64) -> Result<(), ImageError> {
    let pixels = width as u64 * height as u64;
    if pixels > limit {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            pixels,
            limit,
        });
    }
    Ok(())
}

/// PNG colour type 3 (indexed), read from the IHDR chunk.
fn is_indexed_png(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 25 && &bytes[12..16] == b"IHDR" && bytes[25] == 3
}

/// PIL `convert("RGB")` semantics (see the module docs).
fn to_rgb(img: DynamicImage, indexed: bool) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let pixels = match img {
        DynamicImage::ImageLuma16(g) => g.pixels().flat_map(|p| [p.0[0].min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(g) => g.pixels().flat_map(|p| [p.0[0].min(255) as u8; 3]).collect(),
        DynamicImage::ImageRgba8(rgba) if indexed => {
            // Palette with colour-key transparency: the transparent entry's colour becomes white.
            let keys: std::collections::BTreeSet<[u8; 3]> = rgba
                .pixels()
                .filter(|p| p.0[3] == 0)
                .map(|p| [p.0[0], p.0[1], p.0[2]])
                .collect();
            let key = (keys.len() == 1).then(|| *keys.iter().next().unwrap());
            rgba.pixels()
                .flat_map(|p| {
                    let rgb = [p.0[0], p.0[1], p.0[2]];
                    if Some(rgb) == key { [255; 3] } else { rgb }
                })
                .collect()
        }
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, pixels }
}

/// CLIP preprocessing with a pixel limit.
#[derive(Clone, Debug)]
pub struct ImageProcessor {
    config: ImageProcessorConfig,
}

impl ImageProcessor {
    /// A processor with the given settings.
    pub fn new(config: ImageProcessorConfig) -> Result<Self, ImageError> {
        config.filter()?;
        if let ResizeTarget::Exact { height: 0, .. }
        | ResizeTarget::Exact { width: 0, .. }
        | ResizeTarget::ShortestEdge { shortest_edge: 0 } = config.resize_target()
        {
            return Err(ImageError::Config("resize size must be positive".into()));
        }
        Ok(Self { config })
    }

    /// The settings.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.config
    }

    /// Load a file (see [`load_rgb`]).
    pub fn load(&self, path: impl AsRef<Path>) -> Result<RgbImage, ImageError> {
        load_rgb(path, self.config.max_pixels)
    }

    /// Resize and crop an RGB image: the 8-bit pixels the reference has before rescaling.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let c = &self.config;
        let mut img = image.clone();
        if c.do_resize {
            let (w, h) = match c.resize_target() {
                ResizeTarget::Exact { height, width } => (width, height),
                ResizeTarget::ShortestEdge { shortest_edge } => {
                    let (short, long) = (img.width.min(img.height), img.width.max(img.height));
                    let long_out = (shortest_edge as f64 * long as f64 / short as f64) as usize;
                    if img.width <= img.height {
                        (shortest_edge, long_out)
                    } else {
                        (long_out, shortest_edge)
                    }
                }
            };
            let filter = c.filter().expect("checked at construction");
            img = RgbImage {
                pixels: resize_u8(&img.pixels, img.width, img.height, 3, w, h, filter),
                width: w,
                height: h,
            };
        }
        if c.do_center_crop {
            let crop = c.crop_size.unwrap_or(CropSize {
                height: 224,
                width: 224,
            });
            img = center_crop(&img, crop.height, crop.width);
        }
        img
    }

    /// Rescale and normalise 8-bit pixels into a `[3, H, W]` f32 array.
    pub fn normalize(&self, image: &RgbImage) -> Vec<f32> {
        let c = &self.config;
        let mean = c.image_mean.unwrap_or(CLIP_MEAN);
        let std = c.image_std.unwrap_or(CLIP_STD);
        let scale = if c.do_rescale { c.rescale_factor as f32 } else { 1.0 };
        let plane = image.width * image.height;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in image.pixels.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                let v = px[ch] as f32 * scale;
                out[ch * plane + i] = if c.do_normalize { (v - mean[ch]) / std[ch] } else { v };
            }
        }
        out
    }

    /// Preprocess images into one `[B, 3, H, W]` batch (all must come out the same size).
    pub fn batch<B: Backend>(&self, images: &[RgbImage], device: &B::Device) -> Result<Tensor<B, 4>, ImageError> {
        let prepared: Vec<RgbImage> = images.iter().map(|i| self.resize_and_crop(i)).collect();
        let (h, w) = prepared.first().map_or((0, 0), |i| (i.height, i.width));
        if prepared.iter().any(|i| i.height != h || i.width != w) {
            return Err(ImageError::Config(
                "images come out in different sizes; enable center crop or an exact resize".into(),
            ));
        }
        let data: Vec<f32> = prepared.iter().flat_map(|i| self.normalize(i)).collect();
        Ok(Tensor::from_data(
            TensorData::new(data, [prepared.len(), 3, h, w]),
            device,
        ))
    }

    /// Load files and preprocess them into a batch.
    pub fn load_batch<B: Backend>(
        &self,
        paths: &[impl AsRef<Path>],
        device: &B::Device,
    ) -> Result<Tensor<B, 4>, ImageError> {
        let images = paths.iter().map(|p| self.load(p)).collect::<Result<Vec<_>, _>>()?;
        self.batch(&images, device)
    }
}

/// Centre crop as HF does (padding with zeros where the image is smaller than the crop).
pub fn center_crop(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    let top = (image.height as i64 - height as i64).div_euclid(2);
    let left = (image.width as i64 - width as i64).div_euclid(2);
    let mut pixels = vec![0u8; height * width * 3];
    for y in 0..height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= image.height as i64 {
            continue;
        }
        for x in 0..width {
            let sx = x as i64 + left;
            if sx < 0 || sx >= image.width as i64 {
                continue;
            }
            let s = (sy as usize * image.width + sx as usize) * 3;
            pixels[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&image.pixels[s..s + 3]);
        }
    }
    RgbImage { width, height, pixels }
}
