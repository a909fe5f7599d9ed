//! A PIL-compatible antialiased resampler for 8-bit images.
//!
//! CLIP's image processor resizes with PIL's `Image.resize(..., BICUBIC)` on uint8 pixels, so a
//! port must reproduce PIL's resampler to land within one grey level of the reference. PIL's
//! algorithm (Pillow `libImaging/Resample.c`, re-implemented here from its documented behaviour):
//!
//! * separable: two passes through an 8-bit intermediate image, in the order Pillow 13 chooses
//!   (see [`resize_u8`]);
//! * the filter support scales with the down-sampling factor (`support * max(1, in/out)`), which is
//!   what makes the filter antialiasing — a plain Catmull-Rom resize is not the same;
//! * per output pixel, weights `filter((x - center + 0.5) / scale)` over `[center - support,
//!   center + support)` (bounds rounded half up, clamped), normalised to sum 1, then converted to
//!   fixed point with 22 fractional bits (rounded away from zero); accumulation starts at one half
//!   and the result is shifted and clamped to `0..=255`.
//!
//! The bicubic kernel is Keys' cubic convolution with `a = -0.5`.

/// A resampling filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// PIL `BICUBIC` (Keys, a = -0.5, support 2).
    Bicubic,
    /// PIL `BILINEAR` (triangle, support 1).
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Bicubic => 2.0,
            Self::Bilinear => 1.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point coefficients of one axis: for each output index, the first input index and the
/// weights (as many as the window covers).
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates towards zero.
        let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
        let xmax = ((center + support + 0.5).trunc() as i64).min(in_size as i64).max(0) as usize;
        let count = xmax.saturating_sub(xmin);
        let raw: Vec<f64> = (0..count)
            .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * (1u64 << PRECISION_BITS) as f64;
                if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                }
            })
            .collect();
        bounds.push((xmin, count));
        weights.push(fixed);
    }
    Coefficients { bounds, weights }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Horizontal pass: rows `first_row..first_row + rows` of `src` (`width` wide) resampled to the
/// coefficients' output width.
fn horizontal(
    src: &[u8],
    width: usize,
    channels: usize,
    first_row: usize,
    rows: usize,
    coeffs: &Coefficients,
) -> Vec<u8> {
    let out_width = coeffs.bounds.len();
    let mut out = vec![0u8; rows * out_width * channels];
    for y in 0..rows {
        let line = &src[(y + first_row) * width * channels..(y + first_row + 1) * width * channels];
        for (xx, (&(xmin, count), k)) in coeffs.bounds.iter().zip(&coeffs.weights).enumerate() {
            for c in 0..channels {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (x, &w) in k.iter().enumerate().take(count) {
                    acc += line[(xmin + x) * channels + c] as i64 * w as i64;
                }
                out[(y * out_width + xx) * channels + c] = clip8(acc);
            }
        }
    }
    out
}

/// Vertical pass: `src` (`width` wide) resampled to the coefficients' output height, with the
/// window bounds shifted up by `shift` rows (the rows a preceding horizontal pass skipped).
fn vertical(src: &[u8], width: usize, channels: usize, shift: usize, coeffs: &Coefficients) -> Vec<u8> {
    let out_height = coeffs.bounds.len();
    let mut out = vec![0u8; out_height * width * channels];
    for (yy, (&(ymin, count), k)) in coeffs.bounds.iter().zip(&coeffs.weights).enumerate() {
        let ymin = ymin - shift;
        for x in 0..width {
            for c in 0..channels {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (y, &w) in k.iter().enumerate().take(count) {
                    acc += src[((ymin + y) * width + x) * channels + c] as i64 * w as i64;
                }
                out[(yy * width + x) * channels + c] = clip8(acc);
            }
        }
    }
    out
}

/// Resize an interleaved 8-bit image (`height * width * channels`, row-major) to
/// `out_width x out_height` as PIL's `Image.resize(size, filter)` does.
///
/// Pass order follows Pillow 13: the vertical pass runs first when the height shrinks by more
/// than twice as many pixels as the width (`in_h - out_h > 2 (in_w - out_w)`), otherwise the
/// horizontal pass runs first over just the rows the vertical pass reads. (Pillow 12 and older
/// always ran the horizontal pass first; the two orders can differ by a few levels.)
pub fn resize_u8(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_width: usize,
    out_height: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(
        pixels.len(),
        width * height * channels,
        "pixel buffer does not match its size"
    );
    assert!(out_width > 0 && out_height > 0, "output size must be positive");
    let need_h = out_width != width;
    let need_v = out_height != height;
    let (dh, dw) = (height as i64 - out_height as i64, width as i64 - out_width as i64);
    let horizontal_first = !(dh > 0 && dh > 2 * dw);
    let hc = coefficients(width, out_width, filter);
    let vc = coefficients(height, out_height, filter);
    match (need_h, need_v) {
        (false, false) => pixels.to_vec(),
        (true, false) => horizontal(pixels, width, channels, 0, height, &hc),
        (false, true) => vertical(pixels, width, channels, 0, &vc),
        (true, true) if horizontal_first => {
            let first = vc.bounds[0].0;
            let last = vc.bounds.last().map_or(0, |&(s, n)| s + n);
            let temp = horizontal(pixels, width, channels, first, last - first, &hc);
            vertical(&temp, out_width, channels, first, &vc)
        }
        (true, true) => {
            let temp = vertical(pixels, width, channels, 0, &vc);
            horizontal(&temp, width, channels, 0, out_height, &hc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let px: Vec<u8> = (0..4 * 3 * 3).map(|v| v as u8).collect();
        assert_eq!(resize_u8(&px, 4, 3, 3, 4, 3, Filter::Bicubic), px);
    }

    #[test]
    fn constant_images_stay_constant() {
        for (w, h, ow, oh) in [(10, 7, 3, 2), (3, 2, 11, 9), (64, 48, 17, 40)] {
            let px = vec![137u8; w * h];
            assert!(
                resize_u8(&px, w, h, 1, ow, oh, Filter::Bicubic)
                    .iter()
                    .all(|&v| v == 137)
            );
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(300, 48), (48, 300), (7, 5), (640, 224)] {
            let c = coefficients(i, o, Filter::Bicubic);
            for k in &c.weights {
                let sum: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {sum}");
            }
        }
    }

    #[test]
    fn downscale_support_widens_with_the_factor() {
        let c = coefficients(400, 100, Filter::Bicubic);
        // support 2 * 4 = 8 on each side: 16 taps inside the image.
        assert_eq!(c.bounds[10].1, 16);
        let up = coefficients(100, 400, Filter::Bicubic);
        assert!(up.bounds[200].1 <= 5);
    }
}
