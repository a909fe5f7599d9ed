//! Loss curves as SVG pictures, from a run's metrics (`kosmos plot`); no plotting dependency.
//!
//! The picture shows the training loss of every logged step (thin, light) and its exponential
//! moving average (thick), the validation loss where a step validated (dots), on a linear
//! step axis and a logarithmic loss axis with labelled ticks.

use std::fmt::Write;

use crate::metrics::StepMetrics;

/// Options of [`loss_curve_svg`].
#[derive(Clone, Debug)]
pub struct PlotOptions {
    /// The title above the plot.
    pub title: String,
    /// Picture width in pixels.
    pub width: u32,
    /// Picture height in pixels.
    pub height: u32,
    /// Smoothing factor of the moving average (0: none; 0.9 averages about 10 steps).
    pub smoothing: f64,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self {
            title: "training loss".into(),
            width: 720,
            height: 400,
            smoothing: 0.95,
        }
    }
}

/// "Nice" tick values between `lo` and `hi` on a log axis: 1, 2, 5 times powers of ten.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let v = p * m;
            if v >= lo * 0.9999 && v <= hi * 1.0001 {
                out.push(v);
            }
        }
        p *= 10.0;
    }
    out
}

/// Linear ticks between 0 and `hi`: about five, at 1, 2 or 5 times a power of ten.
fn linear_ticks(hi: f64) -> Vec<f64> {
    if hi <= 0.0 {
        return vec![0.0];
    }
    let raw = hi / 5.0;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(p * 10.0);
    (0..)
        .map(|i| i as f64 * step)
        .take_while(|v| *v <= hi * 1.0001)
        .collect()
}

fn label(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// An SVG picture of the loss curve of `steps` (steps with a non-finite or non-positive loss are
/// left out). Returns `None` when no step has a plottable loss.
pub fn loss_curve_svg(steps: &[StepMetrics], options: &PlotOptions) -> Option<String> {
    let points: Vec<(f64, f64)> = steps
        .iter()
        .filter(|m| m.loss.is_finite() && m.loss > 0.0)
        .map(|m| (m.step as f64, m.loss))
        .collect();
    if points.is_empty() {
        return None;
    }
    let val: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|m| {
            m.val_loss
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(|v| (m.step as f64, v))
        })
        .collect();
    let mut smooth = Vec::with_capacity(points.len());
    let mut avg = points[0].1;
    for &(x, y) in &points {
        avg = options.smoothing * avg + (1.0 - options.smoothing) * y;
        smooth.push((x, avg));
    }
    let all = points.iter().chain(&val).map(|p| p.1);
    let lo = all.clone().fold(f64::INFINITY, f64::min) * 0.9;
    let hi = all.fold(0.0, f64::max) * 1.1;
    let x_max = points.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let (w, h) = (options.width as f64, options.height as f64);
    let (left, right, top, bottom) = (64.0, 20.0, 40.0, 48.0);
    let px = |x: f64| left + x / x_max * (w - left - right);
    let py = |y: f64| top + (hi.ln() - y.ln()) / (hi.ln() - lo.ln()).max(1e-12) * (h - top - bottom);
    let path = |pts: &[(f64, f64)]| {
        let mut d = String::new();
        for (i, &(x, y)) in pts.iter().enumerate() {
            let _ = write!(d, "{}{:.1},{:.1}", if i == 0 { "M" } else { " L" }, px(x), py(y));
        }
        d
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        escape(&options.title)
    );
    for t in log_ticks(lo, hi) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            label(t)
        );
    }
    for t in linear_ticks(x_max) {
        let x = px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            h - bottom,
            h - bottom + 16.0,
            label(t)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{:.1}" height="{:.1}" fill="none" stroke="#888"/>"##,
        w - left - right,
        h - top - bottom
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text><text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">loss (log scale)</text>"#,
        left + (w - left - right) / 2.0,
        h - 10.0,
        top + (h - top - bottom) / 2.0,
        top + (h - top - bottom) / 2.0
    );
    let _ = writeln!(
        s,
        r##"<path d="{}" fill="none" stroke="#9ecae1" stroke-width="1"/>"##,
        path(&points)
    );
    let _ = writeln!(
        s,
        r##"<path d="{}" fill="none" stroke="#08519c" stroke-width="2.2"/>"##,
        path(&smooth)
    );
    for &(x, y) in &val {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#e6550d"/>"##,
            px(x),
            py(y)
        );
    }
    // Legend.
    let lx = w - right - 190.0;
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#9ecae1"/><text x="{:.1}" y="{:.1}">loss per step</text>"##,
        lx + 24.0,
        top + 16.0,
        top + 16.0,
        lx + 30.0,
        top + 20.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#08519c" stroke-width="2.2"/><text x="{:.1}" y="{:.1}">moving average</text>"##,
        lx + 24.0,
        top + 34.0,
        top + 34.0,
        lx + 30.0,
        top + 38.0
    );
    if !val.is_empty() {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#e6550d"/><text x="{:.1}" y="{:.1}">validation loss</text>"##,
            lx + 12.0,
            top + 52.0,
            lx + 30.0,
            top + 56.0
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f64, val: Option<f64>) -> StepMetrics {
        StepMetrics {
            step,
            loss,
            lr: 0.0,
            tokens: 0,
            scored_tokens: 0,
            tokens_per_s: 0.0,
            grad_norm: 0.0,
            val_loss: val,
        }
    }

    #[test]
    fn plots_every_finite_point_and_the_validation_dots() {
        let steps: Vec<_> = (1..=100)
            .map(|i| step(i, 8.0 / i as f64, (i % 50 == 0).then_some(9.0 / i as f64)))
            .chain([step(101, f64::NAN, None)])
            .collect();
        let svg = loss_curve_svg(&steps, &PlotOptions::default()).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Two paths of 100 points each (the NaN step left out), two validation dots (plus the
        // legend's).
        let paths: Vec<&str> = svg.lines().filter(|l| l.starts_with("<path")).collect();
        assert_eq!(paths.len(), 2);
        for p in paths {
            assert_eq!(p.matches('L').count(), 99, "{p}");
        }
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(!svg.contains("NaN"));
        // Log ticks cover the range 0.08..8 (with margins): 0.1 and 5 are labelled.
        assert!(svg.contains(">0.10<") && svg.contains(">5<"), "{svg}");
    }

    #[test]
    fn nothing_to_plot_is_none() {
        assert!(loss_curve_svg(&[], &PlotOptions::default()).is_none());
        assert!(loss_curve_svg(&[step(1, f64::INFINITY, None)], &PlotOptions::default()).is_none());
    }

    #[test]
    fn ticks_are_nice_numbers() {
        assert_eq!(log_ticks(0.3, 9.0), vec![0.5, 1.0, 2.0, 5.0]);
        assert_eq!(linear_ticks(3000.0), vec![0.0, 1000.0, 2000.0, 3000.0]);
        assert_eq!(linear_ticks(2400.0), vec![0.0, 500.0, 1000.0, 1500.0, 2000.0]);
    }
}
