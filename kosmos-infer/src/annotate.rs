//! Drawing grounding results onto an image: the `--annotate OUT.png` option of `kosmos ground`
//! and `kosmos generate`.
//!
//! Each [`Annotation`] is a phrase with the boxes the model grounded it to. [`annotate`] draws
//! every box as a rectangle outline, one colour per annotation from [`palette_color`], and puts
//! the phrase in a filled label of the same colour above the box's top-left corner (below the
//! box's top edge when there is no room above, moved left when it would run off the right side).
//! Text is black or white, whichever reads better on the label colour, in a small bitmap font of
//! our own (`crate::font`); characters outside printable ASCII show as a hollow box and labels
//! wider than the image end in `..`. Line width and text size grow with the image.
//!
//! Boxes are normalised `[x1, y1, x2, y2]` with `(0, 0)` the top-left corner of the image and
//! `(1, 1)` the bottom-right one. Coordinates outside `[0, 1]` are clamped, reversed corners are
//! put in order, boxes with a NaN coordinate are skipped, and boxes thinner than the outline are
//! widened around their centre so that they stay visible. Drawing never panics: an empty image
//! comes back unchanged.
//!
//! [`save_annotated`] draws and writes the result, in the format its extension names (PNG when
//! there is none).

use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};

use crate::font::{self, GLYPH_HEIGHT, GLYPH_WIDTH, Glyph};

/// One grounded phrase: the text to show and the boxes it refers to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Annotation {
    /// The phrase, shown as the label of each of its boxes. Runs of whitespace are drawn as one
    /// space; an empty (or all-whitespace) label draws the boxes without labels.
    pub label: String,
    /// Boxes as normalised `[x1, y1, x2, y2]`: `(0, 0)` is the top-left corner of the image and
    /// `(1, 1)` the bottom-right one.
    pub boxes: Vec<[f32; 4]>,
}

impl Annotation {
    /// An annotation for `label` with the given normalised `[x1, y1, x2, y2]` boxes.
    pub fn new(label: impl Into<String>, boxes: Vec<[f32; 4]>) -> Self {
        Self {
            label: label.into(),
            boxes,
        }
    }
}

/// Why [`save_annotated`] could not write the annotated image. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum AnnotateError {
    /// The extension of the output path names no format that can be written.
    #[error(
        "cannot write annotated image `{path}`: unsupported extension `.{extension}` \
         (use .png, .jpg, .jpeg, .webp, .gif or .bmp)"
    )]
    UnsupportedFormat {
        /// The output path.
        path: PathBuf,
        /// Its extension, as given.
        extension: String,
    },
    /// The image has no pixels, which no format can store.
    #[error("cannot write annotated image `{path}`: the image is empty ({width}x{height} pixels)")]
    EmptyImage {
        /// The output path.
        path: PathBuf,
        /// Width of the image.
        width: u32,
        /// Height of the image.
        height: u32,
    },
    /// Encoding the image or writing the file failed.
    #[error("cannot write annotated image `{path}`: {source}")]
    Write {
        /// The output path.
        path: PathBuf,
        /// The encoder's or the OS's error.
        #[source]
        source: image::ImageError,
    },
}

/// Annotation colours, chosen to be far apart from each other and readable with black or white
/// text.
const PALETTE: [Rgb<u8>; 14] = [
    Rgb([230, 40, 40]),   // red
    Rgb([30, 100, 230]),  // blue
    Rgb([250, 220, 30]),  // yellow
    Rgb([40, 170, 60]),   // green
    Rgb([150, 50, 200]),  // purple
    Rgb([250, 140, 20]),  // orange
    Rgb([0, 210, 220]),   // cyan
    Rgb([240, 60, 200]),  // magenta
    Rgb([120, 70, 20]),   // brown
    Rgb([170, 240, 80]),  // lime
    Rgb([0, 110, 110]),   // teal
    Rgb([255, 160, 190]), // pink
    Rgb([20, 30, 110]),   // navy
    Rgb([190, 190, 255]), // lavender
];

/// Colour of the annotation at `index`: a palette of 14 clearly distinct colours, repeated for
/// indices past its end.
pub fn palette_color(index: usize) -> Rgb<u8> {
    PALETTE[index % PALETTE.len()]
}

/// Outline width in pixels for a `width` x `height` image: about 1/150 of the shorter side, at
/// least 1.
fn line_width(width: u32, height: u32) -> u32 {
    ((width.min(height) as f64 / 150.0).round() as u32).max(1)
}

/// Integer scale of the font for a `width` x `height` image: 1 up to 399 pixels on the shorter
/// side, one more per 200 pixels after that.
fn font_scale(width: u32, height: u32) -> u32 {
    (width.min(height) / 200).max(1)
}

/// Black or white, whichever contrasts more with `background` (by its luma).
fn text_color(background: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = background.0.map(u32::from);
    let luma = (299 * r + 587 * g + 114 * b) / 1000;
    if luma >= 140 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    }
}

/// A pixel rectangle, `x0..x1` by `y0..y1` (ends excluded). It may reach outside the image;
/// drawing clips it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    const fn new(x0: i64, y0: i64, x1: i64, y1: i64) -> Self {
        Self { x0, y0, x1, y1 }
    }
}

/// Fills `rect`, clipped to the image.
fn fill(image: &mut RgbImage, rect: Rect, color: Rgb<u8>) {
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    let (x0, x1) = (rect.x0.max(0), rect.x1.min(w));
    let (y0, y1) = (rect.y0.max(0), rect.y1.min(h));
    for y in y0..y1 {
        for x in x0..x1 {
            image.put_pixel(x as u32, y as u32, color);
        }
    }
}

/// The pixels a normalised coordinate range `a..b` covers on an axis of `n` pixels, at least
/// `min_len` long (widened around its centre and kept inside the axis).
fn pixel_span(a: f32, b: f32, n: u32, min_len: i64) -> (i64, i64) {
    let n = i64::from(n);
    let (lo, hi) = (f64::from(a.min(b)), f64::from(a.max(b)));
    // Rounded to the nearest pixel boundary, so that f32 noise (0.8 * 300 = 240.0000036) adds
    // no pixel.
    let mut start = ((lo * n as f64).round() as i64).clamp(0, n);
    let mut end = ((hi * n as f64).round() as i64).clamp(0, n);
    if end - start < min_len {
        let len = min_len.min(n);
        let centre = (start + end) / 2;
        start = (centre - len / 2).clamp(0, n - len);
        end = start + len;
    }
    (start, end)
}

/// The pixel rectangle of a normalised box on a `width` x `height` image with outlines of
/// `line` pixels, or `None` for a box with a NaN coordinate or an empty image.
fn box_rect(bbox: [f32; 4], width: u32, height: u32, line: u32) -> Option<Rect> {
    if width == 0 || height == 0 || bbox.iter().any(|v| v.is_nan()) {
        return None;
    }
    let [ax, ay, bx, by] = bbox.map(|v| v.clamp(0.0, 1.0));
    // Room for both sides of the outline and a gap between them.
    let min_len = 2 * i64::from(line) + 2;
    let (x0, x1) = pixel_span(ax, bx, width, min_len);
    let (y0, y1) = pixel_span(ay, by, height, min_len);
    Some(Rect::new(x0, y0, x1, y1))
}

/// Draws the outline of `rect`, `line` pixels wide, inside the rectangle.
fn draw_outline(image: &mut RgbImage, rect: Rect, line: u32, color: Rgb<u8>) {
    let t = i64::from(line);
    let Rect { x0, y0, x1, y1 } = rect;
    fill(image, Rect::new(x0, y0, x1, (y0 + t).min(y1)), color);
    fill(image, Rect::new(x0, (y1 - t).max(y0), x1, y1), color);
    fill(image, Rect::new(x0, y0, (x0 + t).min(x1), y1), color);
    fill(image, Rect::new((x1 - t).max(x0), y0, x1, y1), color);
}

/// A label ready to draw: its rectangle, colours and glyphs.
#[derive(Debug, Clone)]
struct Label {
    rect: Rect,
    background: Rgb<u8>,
    text: Rgb<u8>,
    glyphs: Vec<&'static Glyph>,
    scale: i64,
}

/// Padding around the text of a label, in pixels.
fn label_padding(scale: i64) -> i64 {
    scale
}

/// Distance from one glyph to the next, in pixels: the glyph and one column of space.
fn glyph_advance(scale: i64) -> i64 {
    (i64::from(GLYPH_WIDTH) + 1) * scale
}

/// Width of a label of `chars` glyphs, padding included.
fn label_width(chars: usize, scale: i64) -> i64 {
    let text = (chars as i64).saturating_mul(glyph_advance(scale)) - scale;
    2 * label_padding(scale) + text.max(0)
}

/// Height of a label, padding included.
fn label_height(scale: i64) -> i64 {
    2 * label_padding(scale) + i64::from(GLYPH_HEIGHT) * scale
}

/// Places the label for `text` on the box `anchor` of a `width` x `height` image: above the box's
/// top-left corner, below the box's top edge when there is no room above, moved left (then up)
/// to stay inside the image, and cut to `..` when wider than the image. `None` for blank text.
fn layout_label(text: &str, anchor: Rect, width: u32, height: u32, scale: u32, color: Rgb<u8>) -> Option<Label> {
    let scale = i64::from(scale.max(1));
    let (w, h) = (i64::from(width), i64::from(height));
    // More characters than the image could show are cut anyway: don't collect them.
    let max_chars = (w / glyph_advance(scale)) as usize + 1;
    let mut chars: Vec<char> = Vec::new();
    for word in text.split_whitespace() {
        if chars.len() > max_chars {
            break;
        }
        if !chars.is_empty() {
            chars.push(' ');
        }
        let room = (max_chars + 1).saturating_sub(chars.len());
        chars.extend(word.chars().take(room));
    }
    if chars.is_empty() {
        return None;
    }
    if label_width(chars.len(), scale) > w {
        // The most glyphs that fit, two of them dots.
        let fit = ((w - 2 * label_padding(scale) + scale) / glyph_advance(scale)).max(0) as usize;
        chars.truncate(fit.saturating_sub(2));
        while chars.last() == Some(&' ') {
            chars.pop();
        }
        chars.extend(['.', '.']);
    }
    let (lw, lh) = (label_width(chars.len(), scale), label_height(scale));
    let mut x = anchor.x0;
    if x + lw > w {
        x = (w - lw).max(0);
    }
    let mut y = anchor.y0 - lh;
    if y < 0 {
        y = anchor.y0;
    }
    if y + lh > h {
        y = (h - lh).max(0);
    }
    Some(Label {
        rect: Rect::new(x, y, x + lw, y + lh),
        background: color,
        text: text_color(color),
        glyphs: chars.into_iter().map(font::glyph).collect(),
        scale,
    })
}

/// Draws a label: its background, then its glyphs.
fn draw_label(image: &mut RgbImage, label: &Label) {
    fill(image, label.rect, label.background);
    let s = label.scale;
    let pad = label_padding(s);
    for (i, glyph) in label.glyphs.iter().enumerate() {
        let gx = label.rect.x0 + pad + i as i64 * glyph_advance(s);
        let gy = label.rect.y0 + pad;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..GLYPH_WIDTH {
                if bits & (1 << (GLYPH_WIDTH - 1 - col)) != 0 {
                    let x = gx + i64::from(col) * s;
                    let y = gy + row as i64 * s;
                    fill(image, Rect::new(x, y, x + s, y + s), label.text);
                }
            }
        }
    }
}

/// A copy of `image` with every box of every annotation drawn as an outline in the annotation's
/// colour ([`palette_color`] of its index) and labelled with its phrase. Labels are drawn after
/// all outlines, so outlines never cover them. An empty image is returned unchanged.
pub fn annotate(image: &RgbImage, annotations: &[Annotation]) -> RgbImage {
    let mut out = image.clone();
    let (width, height) = out.dimensions();
    if width == 0 || height == 0 {
        return out;
    }
    let line = line_width(width, height);
    let scale = font_scale(width, height);
    let mut labels = Vec::new();
    for (index, annotation) in annotations.iter().enumerate() {
        let color = palette_color(index);
        for &bbox in &annotation.boxes {
            let Some(rect) = box_rect(bbox, width, height, line) else {
                continue;
            };
            draw_outline(&mut out, rect, line, color);
            labels.extend(layout_label(&annotation.label, rect, width, height, scale, color));
        }
    }
    for label in &labels {
        draw_label(&mut out, label);
    }
    out
}

/// The format to write `path` in, from its extension (case-insensitive): PNG without one.
fn output_format(path: &Path) -> Result<ImageFormat, AnnotateError> {
    let Some(extension) = path.extension() else {
        return Ok(ImageFormat::Png);
    };
    match extension.to_string_lossy().to_ascii_lowercase().as_str() {
        "png" => Ok(ImageFormat::Png),
        "jpg" | "jpeg" => Ok(ImageFormat::Jpeg),
        "webp" => Ok(ImageFormat::WebP),
        "gif" => Ok(ImageFormat::Gif),
        "bmp" => Ok(ImageFormat::Bmp),
        _ => Err(AnnotateError::UnsupportedFormat {
            path: path.to_path_buf(),
            extension: extension.to_string_lossy().into_owned(),
        }),
    }
}

/// Draws `annotations` onto a copy of `image` (see [`annotate`]) and writes it to `out`, as PNG,
/// JPEG, WebP (lossless), GIF or BMP according to the extension (PNG when there is none). The
/// parent directory must exist; an existing file is replaced.
pub fn save_annotated(image: &RgbImage, annotations: &[Annotation], out: &Path) -> Result<(), AnnotateError> {
    let format = output_format(out)?;
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return Err(AnnotateError::EmptyImage {
            path: out.to_path_buf(),
            width,
            height,
        });
    }
    annotate(image, annotations)
        .save_with_format(out, format)
        .map_err(|source| AnnotateError::Write {
            path: out.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKGROUND: Rgb<u8> = Rgb([17, 34, 51]);

    fn plain(width: u32, height: u32) -> RgbImage {
        RgbImage::from_pixel(width, height, BACKGROUND)
    }

    /// A fresh, empty directory under the system temp dir for one test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kosmos-annotate-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    impl Rect {
        fn contains(&self, x: i64, y: i64) -> bool {
            (self.x0..self.x1).contains(&x) && (self.y0..self.y1).contains(&y)
        }
    }

    fn in_outline(rect: Rect, line: i64, x: i64, y: i64) -> bool {
        rect.contains(x, y) && (x < rect.x0 + line || x >= rect.x1 - line || y < rect.y0 + line || y >= rect.y1 - line)
    }

    #[test]
    fn palette_has_at_least_12_distinct_colours_and_cycles() {
        assert!(PALETTE.len() >= 12);
        for i in 0..PALETTE.len() {
            for j in i + 1..PALETTE.len() {
                let [a, b] = [palette_color(i), palette_color(j)];
                let d2: i32 = (0..3).map(|k| (i32::from(a.0[k]) - i32::from(b.0[k])).pow(2)).sum();
                assert!(d2 >= 80 * 80, "colours {i} {a:?} and {j} {b:?} are too close");
            }
        }
        assert_eq!(palette_color(PALETTE.len()), palette_color(0));
        assert_eq!(palette_color(2 * PALETTE.len() + 3), palette_color(3));
        assert_ne!(palette_color(0), BACKGROUND);
    }

    #[test]
    fn box_outline_drawn_in_box_colour_and_nowhere_else() {
        let image = plain(300, 300);
        let bbox = [0.2, 0.4, 0.8, 0.9];
        let out = annotate(&image, &[Annotation::new("dog", vec![bbox])]);
        let line = line_width(300, 300);
        assert_eq!(line, 2);
        let rect = box_rect(bbox, 300, 300, line).unwrap();
        assert_eq!(rect, Rect::new(60, 120, 240, 270));
        let label = layout_label("dog", rect, 300, 300, font_scale(300, 300), palette_color(0)).unwrap();
        // The label sits right above the box, starting at its left edge.
        assert_eq!((label.rect.x0, label.rect.y1), (rect.x0, rect.y0));
        let color = palette_color(0);
        for (x, y, &p) in out.enumerate_pixels() {
            let (x, y) = (i64::from(x), i64::from(y));
            if label.rect.contains(x, y) {
                continue;
            }
            let expected = if in_outline(rect, i64::from(line), x, y) {
                color
            } else {
                BACKGROUND
            };
            assert_eq!(p, expected, "pixel ({x}, {y})");
        }
        // Corners and edge midpoints are coloured; the inside right next to the outline is not.
        for (x, y) in [
            (60, 120),
            (239, 269),
            (60, 269),
            (239, 120),
            (150, 121),
            (61, 200),
            (238, 200),
            (150, 268),
        ] {
            assert_eq!(*out.get_pixel(x, y), color, "({x}, {y})");
        }
        for (x, y) in [
            (62, 200),
            (237, 200),
            (150, 122),
            (150, 267),
            (59, 200),
            (240, 200),
            (150, 270),
        ] {
            assert_eq!(*out.get_pixel(x, y), BACKGROUND, "({x}, {y})");
        }
    }

    #[test]
    fn annotations_get_their_own_colours() {
        let image = plain(200, 200);
        let annotations: Vec<_> = (0..3)
            .map(|i| Annotation::new("", vec![[0.1 + 0.3 * i as f32, 0.5, 0.2 + 0.3 * i as f32, 0.9]]))
            .collect();
        let out = annotate(&image, &annotations);
        for i in 0..3 {
            let rect = box_rect(annotations[i].boxes[0], 200, 200, 1).unwrap();
            assert_eq!(*out.get_pixel(rect.x0 as u32, rect.y0 as u32 + 5), palette_color(i));
        }
    }

    #[test]
    fn label_has_background_and_text_pixels() {
        let image = plain(300, 300);
        for index in 0..PALETTE.len() {
            let mut annotations = vec![Annotation::default(); index];
            annotations.push(Annotation::new("Hello, World!", vec![[0.1, 0.5, 0.9, 0.9]]));
            let out = annotate(&image, &annotations);
            let color = palette_color(index);
            let rect = box_rect([0.1, 0.5, 0.9, 0.9], 300, 300, 2).unwrap();
            let label = layout_label("Hello, World!", rect, 300, 300, 1, color).unwrap();
            assert_eq!(label.glyphs.len(), 13);
            assert_eq!(label.rect.x1 - label.rect.x0, label_width(13, 1));
            assert_eq!(label.rect.y1 - label.rect.y0, label_height(1));
            let (mut text, mut back) = (0, 0);
            for y in label.rect.y0..label.rect.y1 {
                for x in label.rect.x0..label.rect.x1 {
                    let p = *out.get_pixel(x as u32, y as u32);
                    if p == label.text {
                        text += 1;
                    } else {
                        assert_eq!(p, color, "label pixel ({x}, {y})");
                        back += 1;
                    }
                }
            }
            assert!(text > 13 * 5, "only {text} text pixels");
            assert!(back > text);
            // The padding row and column are background.
            assert_eq!(*out.get_pixel(label.rect.x0 as u32, label.rect.y0 as u32), color);
        }
    }

    #[test]
    fn text_is_black_on_light_and_white_on_dark() {
        assert_eq!(text_color(Rgb([250, 220, 30])), Rgb([0, 0, 0]));
        assert_eq!(text_color(Rgb([255, 255, 255])), Rgb([0, 0, 0]));
        assert_eq!(text_color(Rgb([20, 30, 110])), Rgb([255, 255, 255]));
        assert_eq!(text_color(Rgb([0, 0, 0])), Rgb([255, 255, 255]));
        // The yellow label gets black text, the navy one white text.
        let image = plain(200, 200);
        let bbox = [0.3, 0.5, 0.7, 0.9];
        for (index, expected) in [(2, Rgb([0, 0, 0])), (12, Rgb([255, 255, 255]))] {
            let mut annotations = vec![Annotation::default(); index];
            annotations.push(Annotation::new("I", vec![bbox]));
            let out = annotate(&image, &annotations);
            let rect = box_rect(bbox, 200, 200, 1).unwrap();
            // 'I' has its top bar from column 1 to 3 of the glyph.
            let (x, y) = (rect.x0 + 1 + 2, rect.y0 - label_height(1) + 1);
            assert_eq!(*out.get_pixel(x as u32, y as u32), expected);
        }
    }

    #[test]
    fn ascii_glyphs_are_non_empty_and_pairwise_distinct() {
        let glyphs: Vec<(char, &Glyph)> = (32u8..=126).map(|b| (b as char, font::glyph(b as char))).collect();
        assert_eq!(glyphs.len(), 95);
        for &(c, g) in &glyphs {
            assert!(
                g.iter().all(|row| row >> GLYPH_WIDTH == 0),
                "{c:?} is wider than the cell"
            );
            assert_eq!(g.iter().all(|&row| row == 0), c == ' ', "{c:?}");
            assert_ne!(*g, font::PLACEHOLDER, "{c:?} looks like the placeholder");
        }
        for (i, &(a, ga)) in glyphs.iter().enumerate() {
            for &(b, gb) in &glyphs[i + 1..] {
                assert_ne!(ga, gb, "{a:?} and {b:?} share a glyph");
            }
        }
    }

    #[test]
    fn non_ascii_characters_render_as_placeholder() {
        for c in ['é', '中', '\u{7f}', '\0', '😀'] {
            assert_eq!(*font::glyph(c), font::PLACEHOLDER, "{c:?}");
        }
        let rect = Rect::new(10, 50, 100, 90);
        let label = layout_label("a é", rect, 200, 200, 1, palette_color(0)).unwrap();
        assert_eq!(
            label.glyphs,
            vec![font::glyph('a'), font::glyph(' '), &font::PLACEHOLDER]
        );
        // Whitespace is normalised: runs become one space, ends are trimmed.
        let label = layout_label("\t a \n\n b  ", rect, 200, 200, 1, palette_color(0)).unwrap();
        assert_eq!(label.glyphs, vec![font::glyph('a'), font::glyph(' '), font::glyph('b')]);
    }

    #[test]
    fn line_width_and_font_scale_grow_with_image_size() {
        assert_eq!(line_width(1, 1), 1);
        assert_eq!(line_width(150, 150), 1);
        assert_eq!(line_width(300, 300), 2);
        assert_eq!(line_width(1500, 1500), 10);
        assert_eq!(line_width(3000, 300), 2, "the shorter side counts");
        assert_eq!(font_scale(100, 100), 1);
        assert_eq!(font_scale(400, 400), 2);
        assert_eq!(font_scale(1000, 1000), 5);
        assert_eq!(font_scale(100, 4000), 1, "the shorter side counts");
        let sizes = [0, 1, 50, 100, 224, 300, 490, 800, 1024, 2048, 4096, 10_000];
        for pair in sizes.windows(2) {
            assert!(line_width(pair[0], pair[0]) <= line_width(pair[1], pair[1]));
            assert!(font_scale(pair[0], pair[0]) <= font_scale(pair[1], pair[1]));
        }
        assert!(line_width(4096, 4096) > line_width(224, 224));
        assert!(font_scale(4096, 4096) > font_scale(224, 224));

        // The drawn outline and label grow accordingly.
        for size in [150u32, 600, 1200] {
            let image = plain(size, size);
            let bbox = [0.25, 0.5, 0.75, 0.75];
            let out = annotate(&image, &[Annotation::new("x", vec![bbox])]);
            let line = line_width(size, size);
            let rect = box_rect(bbox, size, size, line).unwrap();
            let y = ((rect.y0 + rect.y1) / 2) as u32;
            let run = (rect.x0 as u32..size)
                .take_while(|&x| *out.get_pixel(x, y) == palette_color(0))
                .count();
            assert_eq!(run as u32, line, "outline width at {size}px");
            let scale = font_scale(size, size);
            let label = layout_label("x", rect, size, size, scale, palette_color(0)).unwrap();
            assert_eq!(label.rect.y1 - label.rect.y0, label_height(i64::from(scale)));
            assert_eq!(label.rect.x1 - label.rect.x0, i64::from(7 * scale));
        }
    }

    #[test]
    fn out_of_range_boxes_are_clamped() {
        let image = plain(200, 100);
        assert_eq!(
            box_rect([-0.5, -1.0, 1.5, 2.0], 200, 100, 1),
            Some(Rect::new(0, 0, 200, 100))
        );
        let inf = f32::INFINITY;
        assert_eq!(
            box_rect([-inf, 0.5, inf, 1.0], 200, 100, 1),
            Some(Rect::new(0, 50, 200, 100))
        );
        assert_eq!(
            box_rect([f32::MIN, 0.0, f32::MAX, 0.5], 200, 100, 1),
            Some(Rect::new(0, 0, 200, 50))
        );
        // Reversed corners are put in order.
        assert_eq!(
            box_rect([0.8, 0.9, 0.2, 0.4], 200, 100, 1),
            box_rect([0.2, 0.4, 0.8, 0.9], 200, 100, 1)
        );

        let out = annotate(&image, &[Annotation::new("", vec![[-0.5, -1.0, 1.5, 2.0]])]);
        let color = palette_color(0);
        let full = Rect::new(0, 0, 200, 100);
        for (x, y, &p) in out.enumerate_pixels() {
            let expected = if in_outline(full, 1, x.into(), y.into()) {
                color
            } else {
                BACKGROUND
            };
            assert_eq!(p, expected, "pixel ({x}, {y})");
        }
    }

    #[test]
    fn nan_boxes_are_ignored() {
        let image = plain(120, 80);
        let nan = f32::NAN;
        let annotations = [
            Annotation::new("cat", vec![[nan, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, nan]]),
            Annotation::new("dog", vec![]),
        ];
        assert_eq!(annotate(&image, &annotations), image);
        // The valid box next to a NaN one is still drawn.
        let annotations = [Annotation::new("cat", vec![[nan; 4], [0.1, 0.5, 0.5, 0.9]])];
        let out = annotate(&image, &annotations);
        assert_ne!(out, image);
        let rect = box_rect([0.1, 0.5, 0.5, 0.9], 120, 80, 1).unwrap();
        assert_eq!(*out.get_pixel(rect.x0 as u32, rect.y1 as u32 - 1), palette_color(0));
    }

    #[test]
    fn degenerate_and_tiny_boxes_stay_visible() {
        for (w, h) in [(300u32, 300u32), (640, 480), (3, 3), (1, 1), (1, 7)] {
            let line = line_width(w, h);
            for bbox in [
                [0.5, 0.5, 0.5, 0.5],
                [0.5, 0.5, 0.5001, 0.5001],
                [0.0, 0.0, 0.0, 0.0],
                [1.0, 1.0, 1.0, 1.0],
            ] {
                let rect = box_rect(bbox, w, h, line).unwrap();
                let min = 2 * i64::from(line) + 2;
                assert_eq!(rect.x1 - rect.x0, min.min(w.into()), "{bbox:?} on {w}x{h}");
                assert_eq!(rect.y1 - rect.y0, min.min(h.into()), "{bbox:?} on {w}x{h}");
                assert!(rect.x0 >= 0 && rect.y0 >= 0 && rect.x1 <= w.into() && rect.y1 <= h.into());
                let out = annotate(&plain(w, h), &[Annotation::new("", vec![bbox])]);
                let coloured = out.pixels().filter(|&&p| p == palette_color(0)).count();
                assert!(coloured > 0, "{bbox:?} on {w}x{h} is invisible");
            }
        }
        // A point box in the middle of a large image is a small square around that point.
        let rect = box_rect([0.5, 0.5, 0.5, 0.5], 300, 300, 2).unwrap();
        assert_eq!(rect, Rect::new(147, 147, 153, 153));
    }

    #[test]
    fn label_moves_below_top_edge_and_left_when_out_of_room() {
        let color = palette_color(0);
        // Room above: right above the box.
        let rect = Rect::new(20, 50, 80, 90);
        let label = layout_label("tree", rect, 200, 100, 1, color).unwrap();
        assert_eq!(label.rect, Rect::new(20, 50 - 9, 20 + 25, 50));
        // No room above: inside the box, below its top edge.
        let rect = Rect::new(20, 3, 80, 90);
        let label = layout_label("tree", rect, 200, 100, 1, color).unwrap();
        assert_eq!(label.rect, Rect::new(20, 3, 45, 12));
        // Would overflow on the right: moved left to end at the image's edge.
        let rect = Rect::new(190, 50, 200, 90);
        let label = layout_label("tree", rect, 200, 100, 1, color).unwrap();
        assert_eq!(label.rect, Rect::new(175, 41, 200, 50));
        // Box at the bottom-right corner of a tiny image: the label is pushed into the image.
        let label = layout_label("tree", Rect::new(26, 6, 30, 10), 30, 10, 1, color).unwrap();
        assert_eq!(label.rect, Rect::new(5, 1, 30, 10));

        // Drawn: the label's pixels lie inside the image, at the top of the box.
        let image = plain(200, 100);
        let out = annotate(&image, &[Annotation::new("tree", vec![[0.9, 0.0, 1.0, 0.9]])]);
        let rect = box_rect([0.9, 0.0, 1.0, 0.9], 200, 100, 1).unwrap();
        let label = layout_label("tree", rect, 200, 100, 1, color).unwrap();
        assert_eq!(label.rect, Rect::new(175, 0, 200, 9));
        let text = text_color(color);
        assert!((0..9).any(|y| (175..200).any(|x| *out.get_pixel(x, y) == text)));
    }

    #[test]
    fn long_labels_are_truncated_with_dots() {
        let color = palette_color(0);
        let rect = Rect::new(0, 30, 100, 100);
        let long = "abcdefghij".repeat(5);
        let label = layout_label(&long, rect, 100, 100, 1, color).unwrap();
        assert!(label.rect.x1 - label.rect.x0 <= 100);
        assert_eq!(label.rect.x0, 0);
        let n = label.glyphs.len();
        assert_eq!(n, 16, "as many glyphs as fit");
        assert_eq!(
            label.glyphs[..n - 2],
            (0..14)
                .map(|i| font::glyph(long.as_bytes()[i] as char))
                .collect::<Vec<_>>()
        );
        assert_eq!(label.glyphs[n - 2..], [font::glyph('.'), font::glyph('.')]);
        // A label that fits exactly is left alone.
        let fits = "a".repeat(16);
        assert_eq!(label_width(16, 1), 97);
        assert_eq!(layout_label(&fits, rect, 100, 100, 1, color).unwrap().glyphs.len(), 16);
        // Spaces are not kept before the dots.
        let label = layout_label("abcdefghijklm opqrstuvwxyz", rect, 100, 100, 1, color).unwrap();
        assert_eq!(label.glyphs.len(), 15);
        assert_eq!(label.glyphs[12], font::glyph('m'));
        // Scaled fonts truncate too, and huge labels are fine.
        let huge = "x".repeat(1_000_000);
        let label = layout_label(&huge, rect, 1000, 1000, 5, color).unwrap();
        assert!(label.rect.x1 - label.rect.x0 <= 1000);
        assert_eq!(label.glyphs.last(), Some(&font::glyph('.')));
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let boxes = vec![
            [0.0, 0.0, 1.0, 1.0],
            [f32::MAX, f32::MIN, -inf, inf],
            [1e30, 1e30, -1e30, -1e30],
            [nan, nan, nan, nan],
            [0.5, 0.5, 0.5, 0.5],
            [-0.0, 1.0, 1.0, -0.0],
        ];
        let many: Vec<Annotation> = (0..40)
            .map(|i| Annotation::new(format!("thing {i}"), boxes.clone()))
            .collect();
        let annotation_sets: Vec<Vec<Annotation>> = vec![
            vec![],
            vec![Annotation::new("", boxes.clone())],
            vec![Annotation::new("   \n\t", boxes.clone())],
            vec![Annotation::new("ünïcødé 中文 😀", boxes.clone())],
            vec![Annotation::new("y".repeat(100_000), boxes.clone())],
            many,
        ];
        for (w, h) in [
            (0, 0),
            (0, 5),
            (5, 0),
            (1, 1),
            (2, 3),
            (1, 1000),
            (1000, 1),
            (13, 9),
            (401, 399),
        ] {
            let image = plain(w, h);
            for annotations in &annotation_sets {
                let out = annotate(&image, annotations);
                assert_eq!(out.dimensions(), (w, h));
            }
        }
        let dir = temp_dir("empty");
        let path = dir.join("empty.png");
        let err = save_annotated(&plain(0, 0), &annotation_sets[1], &path).unwrap_err();
        assert!(matches!(err, AnnotateError::EmptyImage { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A small image with varied pixels, so that a round trip that changed pixels would show.
    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        })
    }

    #[test]
    fn save_annotated_png_round_trip() {
        let dir = temp_dir("png");
        let image = gradient(64, 48);
        let annotations = [
            Annotation::new("a red ball", vec![[0.1, 0.3, 0.4, 0.8]]),
            Annotation::new("two cats", vec![[0.5, 0.1, 0.9, 0.5], [0.6, 0.6, 0.95, 0.95]]),
        ];
        let expected = annotate(&image, &annotations);
        assert_ne!(expected, image);
        for name in ["out.png", "OUT.PNG", "no_extension"] {
            let path = dir.join(name);
            save_annotated(&image, &annotations, &path).unwrap();
            let reader = image::ImageReader::open(&path).unwrap().with_guessed_format().unwrap();
            assert_eq!(reader.format(), Some(ImageFormat::Png), "{name}");
            assert_eq!(reader.decode().unwrap().to_rgb8(), expected, "{name}");
        }
        // An existing file is replaced.
        let path = dir.join("out.png");
        save_annotated(&image, &[], &path).unwrap();
        assert_eq!(image::open(&path).unwrap().to_rgb8(), image);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn save_annotated_other_formats() {
        let dir = temp_dir("formats");
        let image = gradient(40, 30);
        let annotations = [Annotation::new("box", vec![[0.2, 0.4, 0.8, 0.9]])];
        let expected = annotate(&image, &annotations);
        for (name, format, exact) in [
            ("out.bmp", ImageFormat::Bmp, true),
            ("out.webp", ImageFormat::WebP, true),
            ("out.jpg", ImageFormat::Jpeg, false),
            ("out.JPEG", ImageFormat::Jpeg, false),
            ("out.gif", ImageFormat::Gif, false),
        ] {
            let path = dir.join(name);
            save_annotated(&image, &annotations, &path).unwrap();
            let reader = image::ImageReader::open(&path).unwrap().with_guessed_format().unwrap();
            assert_eq!(reader.format(), Some(format), "{name}");
            let decoded = reader.decode().unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (40, 30), "{name}");
            if exact {
                assert_eq!(decoded, expected, "{name}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unsupported_extension_is_an_error_naming_the_path() {
        let dir = temp_dir("unsupported");
        let image = gradient(8, 8);
        for name in ["out.tiff", "out.txt", "out.png.bak"] {
            let path = dir.join(name);
            let err = save_annotated(&image, &[], &path).unwrap_err();
            assert!(matches!(err, AnnotateError::UnsupportedFormat { .. }), "{err}");
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("unsupported extension"), "{message}");
            assert!(!path.exists());
        }
        // A missing directory is a write error, also naming the path.
        let path = dir.join("missing").join("out.png");
        let err = save_annotated(&image, &[], &path).unwrap_err();
        assert!(matches!(err, AnnotateError::Write { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
