//! `ferryctl bench --plot out.png`: passes per second and device bytes per policy.
//!
//! Drawn with `plotters` into an RGB buffer (its bitmap backend, no image crate) and encoded
//! with `png`. Text is rendered by `ab_glyph` from a font compiled in (`font/`: DejaVu Sans cut
//! down to ASCII, 25 KB), so the plot needs no fontconfig, freetype or installed fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::offload::OffloadReport;

/// DejaVu Sans, ASCII subset (`font/make.sh`, licence in `font/LICENSE`).
static FONT: &[u8] = include_bytes!("font/DejaVuSans-ascii.ttf");

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 620;

/// Why the plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("the compiled-in plot font could not be loaded")]
    Font,
    #[error("drawing the plot: {0}")]
    Draw(String),
    #[error("writing {path}: {reason}")]
    Write { path: String, reason: String },
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

fn register_font() -> Result<(), PlotError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// Bar colours of the LoRA modes (none, backup, fuse).
const MODE_COLORS: [RGBColor; 3] =
    [RGBColor(52, 101, 164), RGBColor(245, 121, 0), RGBColor(115, 210, 22)];

/// One group of bars per policy: `values[policy][series]`; `None` draws "n/a".
struct Bars<'a> {
    title: &'a str,
    y_desc: &'a str,
    policies: &'a [String],
    series: &'a [(&'a str, RGBColor)],
    values: &'a [Vec<Option<f64>>],
    /// How a value is printed above its bar.
    fmt: &'a dyn Fn(f64) -> String,
}

fn draw_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    b: &Bars<'_>,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    let max = b.values.iter().flatten().flatten().copied().fold(0f64, f64::max);
    let top = if max > 0.0 { max * 1.18 } else { 1.0 };
    let n = b.policies.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(b.title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
        .map_err(draw_err)?;
    let names = b.policies.to_vec();
    let label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 16))
        .y_desc(b.y_desc)
        .y_label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(draw_err)?;
    let k = b.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (j, (name, color)) in b.series.iter().enumerate() {
        let bars: Vec<Rectangle<(f64, f64)>> = b
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let y = v.get(j).copied().flatten()?;
                let x0 = i as f64 - 0.4 + j as f64 * width;
                Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.92, y)], color.filled()))
            })
            .collect();
        let color = *color;
        chart
            .draw_series(bars)
            .map_err(draw_err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        let texts: Vec<Text<'_, (f64, f64), String>> = b
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let x = i as f64 - 0.4 + (j as f64 + 0.46) * width;
                let style = TextStyle::from(("sans-serif", 13).into_font()).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    ),
                );
                match v.get(j).copied().flatten() {
                    Some(y) => Text::new((b.fmt)(y), (x, y), style),
                    None => Text::new("n/a".to_string(), (x, 0.0), style),
                }
            })
            .collect();
        chart.draw_series(texts).map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Draws the report's passes per second (per policy, one bar per LoRA mode) and device bytes
/// (peak and budget per policy, without LoRA) into an RGB buffer.
pub fn render(r: &OffloadReport) -> Result<Vec<u8>, PlotError> {
    register_font()?;
    let mut policies: Vec<String> = Vec::new();
    for row in &r.rows {
        if !policies.contains(&row.policy) {
            policies.push(row.policy.clone());
        }
    }
    let modes: Vec<&str> = ["none", "backup", "fuse"]
        .into_iter()
        .filter(|m| r.rows.iter().any(|x| x.lora == *m))
        .collect();
    let row = |p: &str, m: &str| r.rows.iter().find(|x| x.policy == p && x.lora == m);
    let passes: Vec<Vec<Option<f64>>> = policies
        .iter()
        .map(|p| {
            modes
                .iter()
                .map(|m| row(p, m).filter(|x| x.error.is_none()).map(|x| x.passes_per_s))
                .collect()
        })
        .collect();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let device: Vec<Vec<Option<f64>>> = policies
        .iter()
        .map(|p| match row(p, "none") {
            Some(x) if x.error.is_none() => {
                vec![Some(mib(x.peak_device_bytes)), Some(mib(x.budget_bytes))]
            }
            Some(x) => vec![None, Some(mib(x.budget_bytes))],
            None => vec![None, None],
        })
        .collect();
    let mode_series: Vec<(&str, RGBColor)> = modes
        .iter()
        .map(|m| match *m {
            "backup" => ("LoRA backup", MODE_COLORS[1]),
            "fuse" => ("LoRA fuse", MODE_COLORS[2]),
            _ => ("no LoRA", MODE_COLORS[0]),
        })
        .collect();
    let device_series =
        [("peak device", RGBColor(117, 80, 123)), ("budget", RGBColor(186, 189, 182))];

    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let title = format!(
            "ferry bench: {} - {} backend, {}, {} later passes, compute {:.2}x copy time",
            r.model,
            r.backend,
            crate::units::bytes(r.model_bytes),
            r.passes,
            r.compute_ratio
        );
        let body = root.titled(&title, ("sans-serif", 22)).map_err(draw_err)?;
        let (left, right) = body.split_horizontally(WIDTH / 2);
        draw_bars(
            &left,
            &Bars {
                title: "passes per second (higher is better)",
                y_desc: "passes / s",
                policies: &policies,
                series: &mode_series,
                values: &passes,
                fmt: &|v| format!("{v:.2}"),
            },
        )?;
        draw_bars(
            &right,
            &Bars {
                title: "device memory, no LoRA (MiB)",
                y_desc: "MiB",
                policies: &policies,
                series: &device_series,
                values: &device,
                fmt: &|v| if v < 100.0 { format!("{v:.1}") } else { format!("{v:.0}") },
            },
        )?;
        root.present().map_err(draw_err)?;
    }
    Ok(buf)
}

/// [`render`], written as a PNG to `path`.
pub fn write_png(r: &OffloadReport, path: &Path) -> Result<(), PlotError> {
    let buf = render(r)?;
    let err = |e: &dyn std::fmt::Display| PlotError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let file = std::fs::File::create(path).map_err(|e| err(&e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| err(&e))?;
    w.write_image_data(&buf).map_err(|e| err(&e))?;
    w.finish().map_err(|e| err(&e))
}
