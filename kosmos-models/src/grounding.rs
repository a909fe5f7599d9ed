//! KOSMOS-2's grounding format: the location-token codec and the parser of generated text.
//!
//! A box is written as two location tokens on a `P x P` grid (`P = 32`, so 1,024 tokens
//! `<patch_index_0000>`..`<patch_index_1023>`): the cell of its upper-left corner and the cell of
//! its lower-right corner. Grounded text looks like
//! `<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>`, several boxes
//! of one phrase separated by `</delimiter_of_multi_objects/>`.
//!
//! Behaviour equals transformers 5.24.0 (`coordinate_to_patch_index`, `patch_index_to_coordinate`,
//! `Kosmos2Processor.post_process_generation`), including its quirks: character offsets count
//! Unicode scalar values (Python string indices), tags are removed with the non-greedy `<.*?>`
//! (which does not cross newlines and also removes non-tag text such as `< b >`), an object
//! without a phrase gets the name `<patch_index_A><patch_index_B>` and an empty span at the
//! object, and spans are shifted by the leading whitespace stripped from the text (so they can be
//! negative). One deliberate difference: patch indices are ASCII digits only (Python's `\d` also
//! accepts other Unicode decimal digits).

use std::sync::OnceLock;

use regex::Regex;

/// Default grid side of KOSMOS-2 (1,024 location tokens).
pub const DEFAULT_GRID: usize = 32;

/// A normalised box `(x1, y1, x2, y2)` in `[0, 1]` image coordinates.
pub type BoxXyxy = [f64; 4];

/// Why a box cannot be encoded.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// Not `x2 > x1` and `y2 > y1` (or not finite).
    #[error("box {0:?} must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1")]
    Degenerate(BoxXyxy),
    /// A zero grid.
    #[error("the grid must have at least one cell per side")]
    EmptyGrid,
}

/// Box -> `(upper-left cell, lower-right cell)` on a `grid x grid` grid:
/// `ul = floor(y1 P) P + floor(x1 P)`, `lr = ceil(y2 P - 1) P + ceil(x2 P - 1)`.
pub fn coordinate_to_patch_index(bbox: BoxXyxy, grid: usize) -> Result<(i64, i64), CodecError> {
    if grid == 0 {
        return Err(CodecError::EmptyGrid);
    }
    let [x1, y1, x2, y2] = bbox;
    if !(x2 > x1 && y2 > y1) || bbox.iter().any(|v| !v.is_finite()) {
        return Err(CodecError::Degenerate(bbox));
    }
    let p = grid as f64;
    let ul_x = (x1 * p).floor() as i64;
    let ul_y = (y1 * p).floor() as i64;
    let lr_x = (x2 * p - 1.0).ceil() as i64;
    let lr_y = (y2 * p - 1.0).ceil() as i64;
    let g = grid as i64;
    Ok((ul_y * g + ul_x, lr_y * g + lr_x))
}

/// `(upper-left cell, lower-right cell)` -> box. Cell corners when the two cells share a row or a
/// column (or are the same cell), cell centres otherwise — so the round trip is lossy.
pub fn patch_index_to_coordinate(ul: i64, lr: i64, grid: usize) -> BoxXyxy {
    let g = grid.max(1) as i64;
    let cell = 1.0 / g as f64;
    let (ul_x, ul_y) = (ul.rem_euclid(g), ul.div_euclid(g));
    let (lr_x, lr_y) = (lr.rem_euclid(g), lr.div_euclid(g));
    let (ul_x, ul_y, lr_x, lr_y) = (ul_x as f64, ul_y as f64, lr_x as f64, lr_y as f64);
    if ul == lr || ul_x == lr_x || ul_y == lr_y {
        [ul_x * cell, ul_y * cell, lr_x * cell + cell, lr_y * cell + cell]
    } else {
        let h = cell / 2.0;
        [ul_x * cell + h, ul_y * cell + h, lr_x * cell + h, lr_y * cell + h]
    }
}

/// Intersection over union of two `xyxy` boxes (0 when the union is empty).
pub fn iou(a: BoxXyxy, b: BoxXyxy) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: BoxXyxy| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// The location token of a cell, `<patch_index_0044>` (zero-padded to 4 digits).
pub fn patch_index_token(index: i64) -> String {
    if index < 0 {
        // Python's zfill keeps the sign in front: -1 -> "-001".
        format!("<patch_index_-{:03}>", -index)
    } else {
        format!("<patch_index_{index:04}>")
    }
}

/// A box as its two location tokens.
pub fn bbox_to_tokens(bbox: BoxXyxy, grid: usize) -> Result<[String; 2], CodecError> {
    let (ul, lr) = coordinate_to_patch_index(bbox, grid)?;
    Ok([patch_index_token(ul), patch_index_token(lr)])
}

/// A grounded entity: the phrase, its character span in the clean text, and its boxes.
#[derive(Clone, Debug, PartialEq)]
pub struct Entity {
    /// The phrase (or `<patch_index_A><patch_index_B>` for an object without a phrase).
    pub phrase: String,
    /// `[start, end)` in characters of the clean text (may be negative, as the reference's).
    pub span: (i64, i64),
    /// Normalised boxes.
    pub boxes: Vec<BoxXyxy>,
}

/// An entity before conversion: phrase, span in the tagged text, patch-index pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct RawEntity {
    /// The phrase as tagged (leading space kept) or the fake name.
    pub phrase: String,
    /// `[start, end)` in characters of the tagged text.
    pub span: (usize, usize),
    /// `(upper-left, lower-right)` cell pairs.
    pub cells: Vec<(i64, i64)>,
}

fn entity_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(concat!(
            r"(?:(<phrase>([^<]+)</phrase>))?<object>(",
            r"(?:<patch_index_[0-9]+><patch_index_[0-9]+></delimiter_of_multi_objects/>)*",
            r"<patch_index_[0-9]+><patch_index_[0-9]+>)</object>"
        ))
        .expect("valid regex")
    })
}

fn tag_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<.*?>").expect("valid regex"))
}

fn index_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<patch_index_([0-9]+)>").expect("valid regex"))
}

/// Character offset of a byte offset.
fn chars_before(text: &str, byte: usize) -> usize {
    text[..byte].chars().count()
}

/// Byte offset of a character offset.
fn byte_of_char(text: &str, chars: usize) -> usize {
    text.char_indices().nth(chars).map_or(text.len(), |(b, _)| b)
}

/// Python's `int()` of a digit string, saturating instead of growing without bound.
fn parse_index(digits: &str) -> i64 {
    digits
        .bytes()
        .fold(0i64, |acc, d| acc.saturating_mul(10).saturating_add((d - b'0') as i64))
}

/// Entities of tagged text with their patch-index pairs (`extract_entities_with_patch_indices`).
pub fn extract_entities_with_patch_indices(text: &str) -> Vec<RawEntity> {
    let mut out = Vec::new();
    for caps in entity_regex().captures_iter(text) {
        let whole = caps.get(0).expect("match");
        let content = caps.get(3).expect("object content").as_str();
        let mut cells = Vec::new();
        for pair in content.split("</delimiter_of_multi_objects/>") {
            // The reference searches the pair, then the pair without its first character.
            let x = index_regex().captures(pair);
            let y = pair.get(1..).and_then(|rest| index_regex().captures(rest));
            if let (Some(x), Some(y)) = (x, y) {
                cells.push((parse_index(&x[1]), parse_index(&y[1])));
            }
        }
        match caps.get(2) {
            Some(phrase) => out.push(RawEntity {
                phrase: phrase.as_str().to_string(),
                span: (chars_before(text, phrase.start()), chars_before(text, phrase.end())),
                cells,
            }),
            None => {
                let at = chars_before(text, whole.start());
                for (ul, lr) in cells {
                    out.push(RawEntity {
                        phrase: format!("<patch_index_{ul}><patch_index_{lr}>"),
                        span: (at, at),
                        cells: vec![(ul, lr)],
                    });
                }
            }
        }
    }
    out
}

/// Text with every `<...>` tag removed (non-greedy, not across newlines).
pub fn remove_tags(text: &str) -> String {
    tag_regex().replace_all(text, "").into_owned()
}

/// Python's `str.isspace` for one character (Unicode White_Space plus the four separators
/// U+001C..U+001F that Python also strips).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

fn leading_spaces(s: &str) -> i64 {
    (s.chars().count() - s.trim_start_matches(is_py_space).chars().count()) as i64
}

fn trailing_spaces(s: &str) -> i64 {
    (s.chars().count() - s.trim_end_matches(is_py_space).chars().count()) as i64
}

/// Clean text and entities with boxes (`clean_text_and_extract_entities_with_bboxes`).
pub fn clean_text_and_extract_entities(text: &str, grid: usize) -> (String, Vec<Entity>) {
    let processed = remove_tags(text);
    let lead = leading_spaces(&processed);
    let entities = extract_entities_with_patch_indices(text)
        .into_iter()
        .map(|e| {
            // Offsets in the text with tags removed, measured on the prefix as the reference does.
            let start = remove_tags(&text[..byte_of_char(text, e.span.0)]).chars().count() as i64;
            let end = remove_tags(&text[..byte_of_char(text, e.span.1)]).chars().count() as i64;
            let start = start - lead + leading_spaces(&e.phrase);
            let end = end - lead - trailing_spaces(&e.phrase);
            Entity {
                phrase: py_strip(&e.phrase).to_string(),
                span: (start, end),
                boxes: e
                    .cells
                    .iter()
                    .map(|&(ul, lr)| patch_index_to_coordinate(ul, lr, grid))
                    .collect(),
            }
        })
        .collect();
    (py_strip(&processed).to_string(), entities)
}

/// What follows the last `</image>` of generated text (`post_process_generation` without cleanup).
pub fn caption_after_image(text: &str) -> &str {
    text.rsplit("</image>").next().unwrap_or(text)
}

/// `Kosmos2Processor.post_process_generation(text)`: the caption after the last `</image>`,
/// cleaned of tags, with its entities.
pub fn post_process_generation(text: &str) -> (String, Vec<Entity>) {
    clean_text_and_extract_entities(caption_after_image(text), DEFAULT_GRID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_of_every_cell_pair_stays_on_the_grid() {
        // Every (ul, lr) pair with ul <= lr on an 8x8 grid decodes to a box whose re-encoding lands
        // on the same cells when the box is built from cell corners.
        let g = 8usize;
        for ul in 0..(g * g) as i64 {
            for lr in ul..(g * g) as i64 {
                let b = patch_index_to_coordinate(ul, lr, g);
                assert!(b.iter().all(|v| (0.0..=1.0).contains(v)), "{ul},{lr}: {b:?}");
                let (ux, uy, lx, ly) = (ul % 8, ul / 8, lr % 8, lr / 8);
                if lx >= ux && ly >= uy {
                    let corners = [
                        ux as f64 / 8.0,
                        uy as f64 / 8.0,
                        (lx + 1) as f64 / 8.0,
                        (ly + 1) as f64 / 8.0,
                    ];
                    assert_eq!(coordinate_to_patch_index(corners, g).unwrap(), (ul, lr));
                }
            }
        }
    }

    #[test]
    fn degenerate_boxes_are_refused() {
        assert!(coordinate_to_patch_index([0.5, 0.5, 0.5, 0.6], 32).is_err());
        assert!(coordinate_to_patch_index([0.1, 0.1, f64::NAN, 0.6], 32).is_err());
        assert!(coordinate_to_patch_index([0.1, 0.1, f64::INFINITY, 0.6], 32).is_err());
        assert!(coordinate_to_patch_index([0.1, 0.1, 0.2, 0.2], 0).is_err());
    }

    #[test]
    fn tokens_are_zero_padded() {
        assert_eq!(
            bbox_to_tokens([0.0, 0.0, 1.0, 1.0], 32).unwrap(),
            ["<patch_index_0000>".to_string(), "<patch_index_1023>".to_string()]
        );
        assert_eq!(patch_index_token(-1), "<patch_index_-001>");
    }
}
