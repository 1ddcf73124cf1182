//! PNG line plots for the benchmarks (plotters, text drawn with a system TrueType font).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// One line of a plot.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Fonts looked for, in order; DejaVu ships with Debian-based images.
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn ensure_font() -> anyhow::Result<()> {
    // Registered once; a missing font is remembered and reported to every caller.
    static REGISTERED: OnceLock<Result<(), Arc<anyhow::Error>>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| register_system_font().map_err(Arc::new))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
}

/// Registers the first TrueType font found as plotters' sans-serif.
fn register_system_font() -> anyhow::Result<()> {
    let path = std::env::var("RAGCAKE_PLOT_FONT")
        .ok()
        .into_iter()
        .chain(FONT_CANDIDATES.iter().map(|s| s.to_string()))
        .find(|p| Path::new(p).is_file())
        .context("no TrueType font found (set RAGCAKE_PLOT_FONT)")?;
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(&path)
            .with_context(|| path.clone())?
            .into_boxed_slice(),
    );
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))
}

/// [`line_plot`], saying on stderr where the plot went or why there is none (a missing
/// font must not cost a benchmark its CSV).
pub fn line_plot_or_warn(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) {
    say_where(
        path,
        line_plot(path, title, x_label, y_label, series, log_x),
    );
}

/// Says on stderr where a plot went, or why there is none.
fn say_where(path: &Path, drawn: anyhow::Result<()>) {
    match drawn {
        Ok(()) => eprintln!("plot written to {}", path.display()),
        Err(e) => eprintln!("plot skipped: {e:#}"),
    }
}

/// The smallest and largest of `values` (infinities when there are none).
fn span(values: impl Iterator<Item = (f64, f64)>) -> (f64, f64) {
    values.fold(
        (f64::INFINITY, f64::NEG_INFINITY),
        |(lo, hi), (low, high)| (lo.min(low), hi.max(high)),
    )
}

/// Draws `series` as lines with markers into a PNG at `path`; `log_x` for a log-scale x axis.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> anyhow::Result<()> {
    ensure_font()?;
    let points = || series.iter().flat_map(|s| s.points.iter());
    let (x_min, x_max) = span(points().map(|p| (p.0, p.0)));
    let y_max = points().fold(0f64, |hi, p| hi.max(p.1)) * 1.1;
    anyhow::ensure!(x_min.is_finite() && y_max > 0.0, "nothing to plot");
    super::create_parent_dir(path)?;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, s) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(
                        s.points.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
            draw_legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)?;
        }};
    }
    if log_x {
        draw!(builder.build_cartesian_2d((x_min * 0.9..x_max * 1.1).log_scale(), 0.0..y_max)?);
    } else {
        let pad = (x_max - x_min).max(1.0) * 0.05;
        draw!(builder.build_cartesian_2d(x_min - pad..x_max + pad, 0.0..y_max)?);
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A point with a vertical interval.
#[derive(Debug, Clone, Copy)]
pub struct IntervalPoint {
    pub x: f64,
    pub y: f64,
    /// The interval on y.
    pub low: f64,
    pub high: f64,
}

/// One group of points with intervals; `joined` draws a line through them in order.
pub struct IntervalSeries {
    pub name: String,
    pub joined: bool,
    pub points: Vec<IntervalPoint>,
}

/// [`interval_plot`], saying on stderr where the plot went or why there is none.
pub fn interval_plot_or_warn(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[IntervalSeries],
) {
    say_where(path, interval_plot(path, title, x_label, y_label, series));
}

/// Draws every point of `series` with its interval as an error bar into a PNG at `path`;
/// the y axis spans the intervals (not from 0), so close contenders stay apart.
pub fn interval_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[IntervalSeries],
) -> anyhow::Result<()> {
    ensure_font()?;
    let finite = |p: &&IntervalPoint| p.x.is_finite() && p.low.is_finite() && p.high.is_finite();
    let points = || series.iter().flat_map(|s| s.points.iter()).filter(finite);
    let (x_min, x_max) = span(points().map(|p| (p.x, p.x)));
    let (y_min, y_max) = span(points().map(|p| (p.low, p.high)));
    anyhow::ensure!(x_min.is_finite() && y_min.is_finite(), "nothing to plot");
    super::create_parent_dir(path)?;
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_pad = (x_max - x_min).max(0.1) * 0.05;
    let y_pad = (y_max - y_min).max(0.01) * 0.08;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x_min - x_pad)..(x_max + x_pad),
            (y_min - y_pad)..(y_max + y_pad).min(1.0 + y_pad),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    let colors = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(230, 140, 0),
        RGBColor(120, 70, 160),
        RGBColor(0, 130, 110),
        RGBColor(150, 150, 150),
        RGBColor(170, 60, 60),
        RGBColor(60, 100, 170),
    ];
    for (i, s) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let shown: Vec<IntervalPoint> = s.points.iter().filter(finite).copied().collect();
        if s.joined {
            chart.draw_series(LineSeries::new(
                shown.iter().map(|p| (p.x, p.y)),
                color.stroke_width(2),
            ))?;
        }
        chart.draw_series(
            shown
                .iter()
                .map(|p| ErrorBar::new_vertical(p.x, p.low, p.y, p.high, color.filled(), 8)),
        )?;
        chart
            .draw_series(
                shown
                    .iter()
                    .map(|p| Circle::new((p.x, p.y), 4, color.filled())),
            )?
            .label(s.name.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight, 13)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The series' legend at `position`, in the plots' one style.
fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font_size: u32,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", font_size))
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the legend: {e}"))
}
