//! Evaluation of grounding: referring-expression comprehension (accuracy at IoU >= 0.5) and
//! phrase grounding (recall@1), on annotation files in MDETR's COCO-style layout.
//!
//! MDETR (Kamath et al., 2021) distributes the benchmarks' annotations as COCO-style JSON files
//! (`final_refcoco_testA.json`, `final_refcoco+_*.json`, `final_refcocog_*.json`,
//! `final_flickr_separateGT_test.json`, ...). Each entry of `images` is one *sentence* about a
//! picture: `file_name`, `width`, `height`, `caption` (the expression or the caption) and, for
//! Flickr30k Entities, `tokens_positive_eval` (per phrase, the character spans of the phrase in
//! the caption). Each entry of `annotations` is a ground-truth box of one sentence (`image_id`),
//! `bbox = [x, y, w, h]` in pixels, with (Flickr) the `tokens_positive` spans it belongs to.
//! `kosmos data shapes` writes its data in the same layout.
//!
//! The tasks, as KOSMOS-2 evaluates them (paper, section 4.1):
//!
//! * **Referring expressions**: the prompt is `<grounding><phrase> {expression}</phrase>`; the
//!   first box the model generates is the prediction; it is correct when its IoU with the
//!   ground-truth box is at least 0.5.
//! * **Phrase grounding**: for each phrase, the prompt is the caption up to and including the
//!   phrase, tagged: `<grounding>{text before}<phrase>{phrase}</phrase>` (the spaces before the
//!   phrase go inside the tag, as in the training markup); the first generated box is the
//!   top-1 prediction, correct when its IoU with any of the phrase's ground-truth boxes is at
//!   least 0.5 (the "separate GT" protocol). Recall@1 is the share of correct phrases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kosmos_models::grounding::BoxXyxy;
pub use kosmos_models::grounding::iou;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Problems with an annotation file.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not JSON, or not the expected layout.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the entry and field.
        message: String,
    },
}

/// One referring-expression sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RefExpSample {
    /// The sentence entry's `id`.
    pub id: i64,
    /// The picture, resolved against the image directory.
    pub image: PathBuf,
    /// The expression.
    pub expression: String,
    /// The ground-truth box, normalised `xyxy`.
    pub target: BoxXyxy,
}

/// One phrase of a grounding sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroundingPhrase {
    /// Character span `[start, end)` of the phrase in the caption (its first span).
    pub span: (usize, usize),
    /// The ground-truth boxes, normalised `xyxy` (any of them counts).
    pub boxes: Vec<BoxXyxy>,
}

/// One phrase-grounding sample: a caption and its phrases.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroundingSample {
    /// The sentence entry's `id`.
    pub id: i64,
    /// The picture, resolved against the image directory.
    pub image: PathBuf,
    /// The caption.
    pub caption: String,
    /// Phrases with at least one ground-truth box.
    pub phrases: Vec<GroundingPhrase>,
}

fn format_err(path: &Path, message: String) -> EvalError {
    EvalError::Format {
        path: path.to_path_buf(),
        message,
    }
}

fn read_json(path: &Path) -> Result<Value, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| format_err(path, format!("not JSON: {e}")))
}

fn array<'a>(path: &Path, v: &'a Value, key: &str) -> Result<&'a Vec<Value>, EvalError> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format_err(path, format!("no `{key}` list")))
}

fn field<'a>(path: &Path, v: &'a Value, what: &str, key: &str) -> Result<&'a Value, EvalError> {
    v.get(key)
        .ok_or_else(|| format_err(path, format!("{what} has no `{key}`")))
}

fn int(path: &Path, v: &Value, what: &str, key: &str) -> Result<i64, EvalError> {
    field(path, v, what, key)?
        .as_i64()
        .ok_or_else(|| format_err(path, format!("{what}: `{key}` is not an integer")))
}

fn number(path: &Path, v: &Value, what: &str, key: &str) -> Result<f64, EvalError> {
    field(path, v, what, key)?
        .as_f64()
        .ok_or_else(|| format_err(path, format!("{what}: `{key}` is not a number")))
}

fn string(path: &Path, v: &Value, what: &str, key: &str) -> Result<String, EvalError> {
    Ok(field(path, v, what, key)?
        .as_str()
        .ok_or_else(|| format_err(path, format!("{what}: `{key}` is not a string")))?
        .to_string())
}

/// Spans `[[start, end], ...]`.
fn spans(path: &Path, v: &Value, what: &str) -> Result<Vec<(usize, usize)>, EvalError> {
    let bad = || format_err(path, format!("{what}: spans must be [[start, end], ...]"));
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|s| match s.as_array().map(Vec::as_slice) {
            Some([a, b]) => match (a.as_u64(), b.as_u64()) {
                (Some(a), Some(b)) if a < b => Ok((a as usize, b as usize)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        })
        .collect()
}

struct Sentence {
    id: i64,
    image: PathBuf,
    caption: String,
    raw: Value,
}

struct Annotations {
    sentences: Vec<Sentence>,
    /// Per sentence id: (normalised box, `tokens_positive` spans).
    boxes: BTreeMap<i64, Vec<(BoxXyxy, Vec<(usize, usize)>)>>,
}

fn read_annotations(path: &Path, image_dir: &Path) -> Result<Annotations, EvalError> {
    let root = read_json(path)?;
    let mut sentences = Vec::new();
    let mut sizes = BTreeMap::new();
    for (i, img) in array(path, &root, "images")?.iter().enumerate() {
        let what = format!("images[{i}]");
        let id = int(path, img, &what, "id")?;
        let (width, height) = (number(path, img, &what, "width")?, number(path, img, &what, "height")?);
        if width <= 0.0 || height <= 0.0 {
            return Err(format_err(path, format!("{what}: width and height must be positive")));
        }
        sizes.insert(id, (width, height));
        sentences.push(Sentence {
            id,
            image: image_dir.join(string(path, img, &what, "file_name")?),
            caption: string(path, img, &what, "caption")?,
            raw: img.clone(),
        });
    }
    let mut boxes: BTreeMap<i64, Vec<_>> = BTreeMap::new();
    for (i, ann) in array(path, &root, "annotations")?.iter().enumerate() {
        let what = format!("annotations[{i}]");
        let image_id = int(path, ann, &what, "image_id")?;
        let (w, h) = *sizes
            .get(&image_id)
            .ok_or_else(|| format_err(path, format!("{what}: image_id {image_id} has no entry in `images`")))?;
        let b = field(path, ann, &what, "bbox")?
            .as_array()
            .filter(|b| b.len() == 4)
            .and_then(|b| b.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| format_err(path, format!("{what}: `bbox` must be [x, y, w, h] numbers")))?;
        let xyxy = [b[0] / w, b[1] / h, (b[0] + b[2]) / w, (b[1] + b[3]) / h];
        let tokens = match ann.get("tokens_positive") {
            Some(v) => spans(path, v, &format!("{what}.tokens_positive"))?,
            None => Vec::new(),
        };
        boxes.entry(image_id).or_default().push((xyxy, tokens));
    }
    Ok(Annotations { sentences, boxes })
}

/// Read a referring-expression file (`final_refcoco_testA.json` and the like): one sample per
/// sentence entry, its box the first annotation of the entry. Image paths are resolved against
/// `image_dir`.
pub fn read_refexp(path: &Path, image_dir: &Path) -> Result<Vec<RefExpSample>, EvalError> {
    let ann = read_annotations(path, image_dir)?;
    ann.sentences
        .into_iter()
        .map(|s| {
            let target = ann
                .boxes
                .get(&s.id)
                .and_then(|b| b.first())
                .ok_or_else(|| format_err(path, format!("images entry id {} has no annotation", s.id)))?
                .0;
            Ok(RefExpSample {
                id: s.id,
                image: s.image,
                expression: s.caption,
                target,
            })
        })
        .collect()
}

/// Read a phrase-grounding file (`final_flickr_separateGT_test.json` and the like): per sentence
/// entry, the phrases of `tokens_positive_eval`, each with the boxes whose `tokens_positive`
/// overlap its spans. Phrases without a box are left out (as in the benchmark's protocol).
pub fn read_grounding(path: &Path, image_dir: &Path) -> Result<Vec<GroundingSample>, EvalError> {
    let ann = read_annotations(path, image_dir)?;
    let overlaps =
        |a: &[(usize, usize)], b: &[(usize, usize)]| a.iter().any(|&(s, e)| b.iter().any(|&(s2, e2)| s < e2 && s2 < e));
    let mut out = Vec::new();
    for s in ann.sentences {
        let what = format!("images entry id {}", s.id);
        let eval = s
            .raw
            .get("tokens_positive_eval")
            .and_then(Value::as_array)
            .ok_or_else(|| format_err(path, format!("{what} has no `tokens_positive_eval` list")))?;
        let boxes = ann.boxes.get(&s.id).map(Vec::as_slice).unwrap_or_default();
        let len = s.caption.chars().count();
        let mut phrases = Vec::new();
        for (p, v) in eval.iter().enumerate() {
            let sp = spans(path, v, &format!("{what}.tokens_positive_eval[{p}]"))?;
            let Some(&first) = sp.first() else { continue };
            if sp.iter().any(|&(_, e)| e > len) {
                return Err(format_err(path, format!("{what}: phrase {p} spans past the caption")));
            }
            let gt: Vec<BoxXyxy> = boxes
                .iter()
                .filter(|(_, t)| overlaps(&sp, t))
                .map(|(b, _)| *b)
                .collect();
            if !gt.is_empty() {
                phrases.push(GroundingPhrase { span: first, boxes: gt });
            }
        }
        out.push(GroundingSample {
            id: s.id,
            image: s.image,
            caption: s.caption,
            phrases,
        });
    }
    Ok(out)
}

/// Whether a prediction hits any of the ground-truth boxes at IoU >= `threshold` (a missing
/// prediction never does).
pub fn hit(prediction: Option<BoxXyxy>, truth: &[BoxXyxy], threshold: f64) -> bool {
    prediction.is_some_and(|p| truth.iter().any(|&t| iou(p, t) >= threshold))
}

/// A score: correct out of total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Correct predictions.
    pub correct: usize,
    /// Predictions scored.
    pub total: usize,
    /// `correct / total` (0 when nothing was scored).
    pub value: f64,
}

impl Score {
    /// Score `(prediction, truths)` pairs at IoU >= `threshold`.
    pub fn of<'a>(pairs: impl IntoIterator<Item = (Option<BoxXyxy>, &'a [BoxXyxy])>, threshold: f64) -> Self {
        let (mut correct, mut total) = (0, 0);
        for (p, t) in pairs {
            total += 1;
            correct += usize::from(hit(p, t, threshold));
        }
        Self {
            correct,
            total,
            value: if total > 0 { correct as f64 / total as f64 } else { 0.0 },
        }
    }
}

/// The comprehension prompt of an expression (as `kosmos refer` builds it).
pub fn refexp_prompt(expression: &str) -> String {
    crate::commands::phrase_prompt(expression)
}

/// The grounding prompt of one phrase of a caption: the caption up to the phrase, the spaces
/// before the phrase moved inside `<phrase>`, then `</phrase>`; `span` in characters.
pub fn phrase_grounding_prompt(caption: &str, span: (usize, usize)) -> String {
    let chars: Vec<char> = caption.chars().collect();
    let (mut start, end) = (span.0.min(chars.len()), span.1.min(chars.len()));
    while start > 0 && chars[start - 1] == ' ' {
        start -= 1;
    }
    let before: String = chars[..start].iter().collect();
    let phrase: String = chars[start..end].iter().collect();
    format!("<grounding>{before}<phrase>{phrase}</phrase>")
}

/// Which evaluation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalTask {
    /// Referring-expression comprehension, accuracy at IoU >= 0.5.
    Refexp,
    /// Phrase grounding, recall@1 at IoU >= 0.5.
    Grounding,
}

impl EvalTask {
    /// The annotation file `kosmos data shapes` writes for this task, under its output directory.
    pub fn shapes_file(self) -> &'static str {
        match self {
            Self::Refexp => "mdetr/final_shapes_refexp.json",
            Self::Grounding => "mdetr/final_flickr_separateGT_shapes.json",
        }
    }
}

/// One scored prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// The sentence entry's `id`.
    pub id: i64,
    /// The phrase's index among the sentence's scored phrases (grounding only).
    pub phrase: Option<usize>,
    /// The prompt given to the model.
    pub prompt: String,
    /// The generated text (tags included).
    pub text: String,
    /// The first generated box.
    pub prediction: Option<BoxXyxy>,
    /// Whether it hits a ground-truth box at IoU >= 0.5.
    pub correct: bool,
}

/// The result of an evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    /// The task.
    pub task: EvalTask,
    /// The annotation file.
    pub annotations: PathBuf,
    /// Sentences evaluated.
    pub sentences: usize,
    /// The score (accuracy for refexp, recall@1 for grounding), at IoU >= 0.5.
    pub score: Score,
    /// Wall-clock seconds (loading excluded).
    pub seconds: f64,
    /// Every prediction, in file order.
    pub predictions: Vec<Prediction>,
}

/// Where an evaluation's annotations and pictures are: an annotation file (pictures under
/// `images`, default its directory), or a directory written by `kosmos data shapes`.
pub fn locate(task: EvalTask, data: &Path, images: Option<&Path>) -> Result<(PathBuf, PathBuf), String> {
    if data.is_dir() {
        let file = data.join(task.shapes_file());
        if !file.is_file() {
            return Err(format!(
                "{}: a directory must hold {} (as `kosmos data shapes` writes it); give the annotation file itself otherwise",
                data.display(),
                task.shapes_file()
            ));
        }
        Ok((file, images.map_or_else(|| data.to_path_buf(), Path::to_path_buf)))
    } else if data.is_file() {
        let dir = images.map_or_else(
            || data.parent().map_or_else(PathBuf::new, Path::to_path_buf),
            Path::to_path_buf,
        );
        Ok((data.to_path_buf(), dir))
    } else {
        Err(format!("{}: no such file or directory", data.display()))
    }
}

/// The prompts of a task's samples, each with its picture and ground truth, in file order:
/// `(sentence id, phrase index, image, prompt, ground-truth boxes)`.
pub type EvalItem = (i64, Option<usize>, PathBuf, String, Vec<BoxXyxy>);

/// Read the annotation file of `task` and build its prompts (at most `limit` sentences).
pub fn items(
    task: EvalTask,
    file: &Path,
    images: &Path,
    limit: Option<usize>,
) -> Result<(usize, Vec<EvalItem>), EvalError> {
    let limit = limit.unwrap_or(usize::MAX);
    Ok(match task {
        EvalTask::Refexp => {
            let samples: Vec<_> = read_refexp(file, images)?.into_iter().take(limit).collect();
            let n = samples.len();
            let items = samples
                .into_iter()
                .map(|s| (s.id, None, s.image, refexp_prompt(&s.expression), vec![s.target]))
                .collect();
            (n, items)
        }
        EvalTask::Grounding => {
            let samples: Vec<_> = read_grounding(file, images)?.into_iter().take(limit).collect();
            let n = samples.len();
            let items = samples
                .into_iter()
                .flat_map(|s| {
                    let (id, image, caption) = (s.id, s.image, s.caption);
                    s.phrases.into_iter().enumerate().map(move |(p, phrase)| {
                        (
                            id,
                            Some(p),
                            image.clone(),
                            phrase_grounding_prompt(&caption, phrase.span),
                            phrase.boxes,
                        )
                    })
                })
                .collect();
            (n, items)
        }
    })
}

/// An evaluation run: the model, the annotations and how to decode.
#[derive(Clone, Debug)]
pub struct EvalJob {
    /// The task.
    pub task: EvalTask,
    /// Model and device.
    pub model: crate::commands::ModelArgs,
    /// Annotation file.
    pub annotations: PathBuf,
    /// Directory the annotation file's `file_name`s are relative to.
    pub images: PathBuf,
    /// Evaluate at most this many sentences.
    pub limit: Option<usize>,
    /// Prompts per generation batch (left-padded; 1 reproduces single-prompt decoding exactly).
    pub batch: usize,
    /// New tokens per answer (a box takes four: `<object>`, two locations, `</object>`).
    pub max_new_tokens: usize,
}

impl EvalJob {
    /// Load the model on the chosen backend and score every sample. Errors are one line each.
    pub fn run(self) -> Result<EvalReport, String> {
        use kosmos_core::backend::run_task;
        let device = self
            .model
            .device
            .clone()
            .unwrap_or_else(crate::commands::default_device);
        let dir = crate::commands::resolve_model(self.model.model.as_deref())?;
        crate::pipeline::check_model_dir(&dir).map_err(|e| e.to_string())?;
        if self.batch == 0 {
            return Err("--batch must be at least 1".into());
        }
        let (sentences, items) =
            items(self.task, &self.annotations, &self.images, self.limit).map_err(|e| e.to_string())?;
        run_task(
            &device,
            EvalRun {
                job: self,
                dir,
                sentences,
                items,
            },
        )
        .map_err(|e| e.to_string())?
    }
}

struct EvalRun {
    job: EvalJob,
    dir: PathBuf,
    sentences: usize,
    items: Vec<EvalItem>,
}

impl kosmos_core::backend::BackendTask for EvalRun {
    type Output = Result<EvalReport, String>;

    fn run<B: burn::prelude::Backend>(self, device: B::Device) -> Self::Output {
        use crate::generate::GenerationConfig;
        use crate::pipeline::Request;
        use kosmos_vision::preprocess::load_rgb;
        use std::io::IsTerminal;

        let job = &self.job;
        let pipeline = job.model.load_pipeline::<B>(&self.dir, &device)?;
        let config = GenerationConfig::greedy(job.max_new_tokens);
        let human = std::io::stderr().is_terminal();
        let start = std::time::Instant::now();
        let mut cache: BTreeMap<PathBuf, kosmos_vision::RgbImage> = BTreeMap::new();
        let mut predictions = Vec::with_capacity(self.items.len());
        for chunk in self.items.chunks(job.batch) {
            let mut requests = Vec::with_capacity(chunk.len());
            for (_, _, image, prompt, _) in chunk {
                if !cache.contains_key(image) {
                    let rgb = load_rgb(image, kosmos_vision::ImageProcessorConfig::DEFAULT_MAX_PIXELS)
                        .map_err(|e| e.to_string())?;
                    // Sentences of one picture are consecutive in these files: keep only the last.
                    cache.clear();
                    cache.insert(image.clone(), rgb);
                }
                requests.push(Request {
                    image: Some(cache[image].clone()),
                    prompt: prompt.clone(),
                });
            }
            let answers = pipeline.run(&requests, &config, None).map_err(|e| e.to_string())?;
            for ((id, phrase, _, prompt, truth), answer) in chunk.iter().zip(answers.answers) {
                let prediction = crate::commands::refer_box(&answer);
                predictions.push(Prediction {
                    id: *id,
                    phrase: *phrase,
                    prompt: prompt.clone(),
                    text: answer.text,
                    prediction,
                    correct: hit(prediction, truth, 0.5),
                });
            }
            if human {
                eprint!("\revaluating: {} / {}", predictions.len(), self.items.len());
            }
        }
        if human {
            eprintln!();
        }
        let score = Score::of(
            predictions
                .iter()
                .zip(&self.items)
                .map(|(p, item)| (p.prediction, item.4.as_slice())),
            0.5,
        );
        Ok(EvalReport {
            task: job.task,
            annotations: job.annotations.clone(),
            sentences: self.sentences,
            score,
            seconds: start.elapsed().as_secs_f64(),
            predictions,
        })
    }
}
