//! The benchmark report's plots, as plain SVG: horizontal bar charts (a value per label, in
//! groups of series) and a latency-percentile chart. Written by hand rather than with
//! `plotters`: its text layout needs a font backend (fontconfig through `font-kit`, or a
//! bundled TrueType file), while SVG `<text>` is laid out by whatever displays the file.

use std::fmt::Write;

/// Colours of the series, in order (colour-blind safe).
const PALETTE: [&str; 6] = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"];

/// One bar: its label, and one value per series (`None`: none to show).
#[derive(Debug, Clone)]
pub struct Bar {
    /// What the bar measures.
    pub label: String,
    /// A value per series.
    pub values: Vec<Option<f64>>,
}

/// XML-escapes `s` for text content and attributes.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG document's start: its size, a white background and the title.
fn open_svg(width: f64, height: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="15" font-weight="bold">{}</text>
"#,
        esc(title)
    )
}

/// `v` with thousands separators, or with two decimals below 10.
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    if v.abs() < 10.0 {
        return format!("{v:.2}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// A horizontal bar chart: each bar's series side by side, with their values written at
/// their ends; `log` uses a log₁₀ scale (for figures spanning orders of magnitude). A value
/// that is `None` shows `missing` in its place (nothing when it is empty: a series that does
/// not apply to that bar).
pub fn bar_chart(title: &str, unit: &str, series: &[&str], bars: &[Bar], log: bool, missing: &str) -> String {
    let (label_w, plot_w, row_h, bar_h, top) = (260.0, 460.0, 6.0, 16.0, 48.0);
    let per_bar = series.len().max(1) as f64 * bar_h + row_h * 2.0;
    let height = top + bars.len() as f64 * per_bar + 24.0;
    let width = label_w + plot_w + 140.0;
    let values = bars.iter().flat_map(|b| b.values.iter().flatten().copied()).filter(|v| *v > 0.0);
    let max = values.clone().fold(0.0f64, f64::max).max(1e-9);
    let min = values.fold(f64::INFINITY, f64::min).min(max);
    // On a log scale the axis starts a decade below the smallest value.
    let floor = if log { 10f64.powf(min.log10().floor() - 1.0) } else { 0.0 };
    let scale = |v: f64| -> f64 {
        if log {
            ((v.max(floor).log10() - floor.log10()) / (max.log10() - floor.log10()).max(1e-9)) * plot_w
        } else {
            v / max * plot_w
        }
    };
    let mut s = open_svg(width, height, title);
    // The legend.
    let mut x = 10.0;
    for (i, name) in series.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="30" width="10" height="10" fill="{}"/><text x="{}" y="39">{}</text>"#,
            PALETTE[i % PALETTE.len()],
            x + 14.0,
            esc(name)
        );
        x += 24.0 + 7.0 * name.len() as f64;
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="39" fill="#666">{}{}</text>"##,
        label_w + plot_w - 40.0,
        esc(unit),
        if log { " (log scale)" } else { "" }
    );
    for (row, bar) in bars.iter().enumerate() {
        let y0 = top + row as f64 * per_bar + row_h;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y0 + per_bar / 2.0 - row_h,
            esc(&bar.label)
        );
        for (i, value) in bar.values.iter().enumerate() {
            let y = y0 + i as f64 * bar_h;
            match value {
                Some(v) => {
                    let w = scale(*v).max(1.0);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{label_w}" y="{y}" width="{w:.1}" height="{}" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                        bar_h - 2.0,
                        PALETTE[i % PALETTE.len()],
                        label_w + w + 4.0,
                        y + bar_h - 5.0,
                        human(*v)
                    );
                }
                None if missing.is_empty() => {}
                None => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{}" y="{}" fill="#999">{}</text>"##,
                        label_w + 4.0,
                        y + bar_h - 5.0,
                        esc(missing)
                    );
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "<line x1=\"{label_w}\" y1=\"{top}\" x2=\"{label_w}\" y2=\"{}\" stroke=\"#333\"/>\n</svg>",
        height - 24.0
    );
    s
}

/// A latency chart: each series' latency (µs, log scale) at the percentiles given, as a
/// line over the percentiles (50, 99, 99.9, max...).
pub fn latency_chart(title: &str, percentiles: &[&str], series: &[(&str, Vec<f64>)]) -> String {
    let (left, top, plot_w, plot_h) = (70.0, 50.0, 560.0, 260.0);
    let width = left + plot_w + 40.0;
    let height = top + plot_h + 50.0;
    let all = series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| *v > 0.0);
    let max = all.clone().fold(1.0f64, f64::max);
    let min = all.fold(f64::INFINITY, f64::min).min(max);
    let (lo, hi) = (10f64.powf(min.log10().floor()), 10f64.powf(max.log10().ceil().max(min.log10().floor() + 1.0)));
    let y_of = |v: f64| top + plot_h - (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_h;
    let step = plot_w / (percentiles.len().max(2) - 1) as f64;
    let mut s = open_svg(width, height, title);
    // Decades on the y axis.
    let mut d = lo;
    while d <= hi * 1.0001 {
        let y = y_of(d);
        let label = if d >= 1000.0 { format!("{:.0} ms", d / 1000.0) } else { format!("{d:.0} µs") };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            left + plot_w,
            left - 6.0,
            y + 4.0
        );
        d *= 10.0;
    }
    for (i, p) in percentiles.iter().enumerate() {
        let x = left + i as f64 * step;
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, top + plot_h + 18.0, esc(p));
    }
    for (k, (name, values)) in series.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.0)
            .map(|(i, v)| format!("{:.1},{:.1}", left + i as f64 * step, y_of(*v)))
            .collect();
        let _ =
            writeln!(s, r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#, points.join(" "));
        for p in &points {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
        }
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="30" width="10" height="10" fill="{colour}"/><text x="{}" y="39">{}</text>"#,
            left + k as f64 * 200.0,
            left + k as f64 * 200.0 + 14.0,
            esc(name)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#666\">percentile</text>\n</svg>",
        left + plot_w / 2.0,
        height - 10.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(human(1_234_567.0), "1,234,567");
        assert_eq!(human(999.4), "999");
        assert_eq!(human(0.953), "0.95");
        assert_eq!(human(-12_000.0), "-12,000");
        assert_eq!(human(f64::NAN), "–");
    }

    #[test]
    fn charts_are_well_formed_svg_with_every_label_and_value() {
        let bars = vec![
            Bar { label: "W1 <decode>".into(), values: vec![Some(2_000_000.0), Some(5_000_000.0)] },
            Bar { label: "W2".into(), values: vec![Some(1_500_000.0), None] },
        ];
        let svg = bar_chart("Events/s & floors", "events/s", &["ours", "floor"], &bars, true, "not measured");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("W1 &lt;decode&gt;") && svg.contains("Events/s &amp; floors"));
        assert!(svg.contains("2,000,000") && svg.contains("not measured"));
        assert_eq!(svg.matches("<rect").count(), 1 + 2 + 3, "background, legend, bars");
        let lat = latency_chart("W1 latency", &["p50", "p99", "p99.9"], &[("25 %", vec![40.0, 90.0, 300.0])]);
        let blank = bar_chart("x", "y", &["a", "b"], &bars, false, "");
        assert!(!blank.contains("not measured"), "a series that does not apply leaves its place empty");
        assert!(lat.contains("<polyline") && lat.contains("p99.9") && lat.trim_end().ends_with("</svg>"));
        assert!(!lat.contains("NaN") && !svg.contains("NaN"));
    }
}
