//! The PNG: client-observed lateness (p50/p99) and server CPU against the number of sessions.

use std::path::Path;

use plotters::prelude::*;

use crate::report::StepReport;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Register a system font for labels (Debian `fonts-dejavu-core`); without it the plot has no text.
fn font() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| match std::fs::read(FONT) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        }
        Err(_) => false,
    })
}

/// Draw `reports` into `path`.
pub fn draw(path: &Path, reports: &[StepReport]) -> anyhow::Result<()> {
    let labels = font();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let max_n = reports.iter().map(|r| r.sessions).max().unwrap_or(10) as f64 * 1.05;
    let max_late = reports.iter().map(|r| r.lateness.p99_ms).fold(5.0, f64::max) * 1.1;
    let max_cpu = reports.iter().filter_map(|r| r.cpu_percent).fold(10.0, f64::max) * 1.1;

    let mut a = panel(&left, labels, "frame lateness at the client (ms)", max_n, max_late)?;
    a.draw_series(LineSeries::new(reports.iter().map(|r| (r.sessions as f64, r.lateness.p50_ms)), &BLUE))?
        .label("p50")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLUE));
    a.draw_series(LineSeries::new(reports.iter().map(|r| (r.sessions as f64, r.lateness.p99_ms)), &RED))?
        .label("p99")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], RED));
    a.draw_series(reports.iter().map(|r| Circle::new((r.sessions as f64, r.lateness.p99_ms), 3, RED.filled())))?;
    if labels {
        a.configure_series_labels().border_style(BLACK).draw()?;
    }

    let mut b = panel(&right, labels, "server CPU (% of one core)", max_n, max_cpu)?;
    b.draw_series(LineSeries::new(reports.iter().filter_map(|r| Some((r.sessions as f64, r.cpu_percent?))), &GREEN))?;
    b.draw_series(
        reports.iter().filter_map(|r| Some(Circle::new((r.sessions as f64, r.cpu_percent?), 3, GREEN.filled()))),
    )?;
    root.present()?;
    Ok(())
}

type Axis = plotters::coord::types::RangedCoordf64;
type Panel<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>;

/// One chart: sessions (0..max_x) against a measure (0..max_y); captions and axis labels only
/// when a font is available.
fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    labels: bool,
    caption: &str,
    max_x: f64,
    max_y: f64,
) -> anyhow::Result<Panel<'a, 'b>> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(15).x_label_area_size(35).y_label_area_size(45);
    if labels {
        builder.caption(caption, ("sans-serif", 18));
    }
    let mut chart = builder.build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    if labels {
        chart.configure_mesh().x_desc("concurrent sessions").draw()?;
    }
    Ok(chart)
}
