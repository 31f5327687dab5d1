//! The report's plots, as SVG (plotters' SVG backend: no system fonts or image libraries needed):
//! latency percentiles per mode, short connections/s per mode, and the scaling curves.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{coord::Shift, prelude::*};

use crate::{
    report::{ModeResults, Results, Series, median},
    scaling::Point,
};

type Plot = std::result::Result<(), Box<dyn std::error::Error>>;

const COLORS: [RGBColor; 6] = [
    RGBColor(90, 90, 90),
    RGBColor(200, 60, 40),
    RGBColor(40, 100, 200),
    RGBColor(30, 150, 70),
    RGBColor(150, 60, 170),
    RGBColor(220, 150, 20),
];
const FONT: &str = "sans-serif";

/// A mode's colour, the same in every plot.
fn color(results: &Results, mode: &str) -> RGBColor {
    let i = results.modes.iter().position(|m| m.mode.name == mode).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

/// Writes latency.svg, connections.svg and scaling.svg into `dir`.
pub fn write_all(results: &Results, dir: &Path) -> Result<()> {
    let named = |name: &str, e: Box<dyn std::error::Error>| anyhow!("plot {name}: {e}");
    latency(results, &dir.join("latency.svg")).map_err(|e| named("latency.svg", e))?;
    connections(results, &dir.join("connections.svg")).map_err(|e| named("connections.svg", e))?;
    scaling(results, &dir.join("scaling.svg")).map_err(|e| named("scaling.svg", e))?;
    Ok(())
}

/// "Nines" on the x axis: x = -log10(1 - q), so 90% is 1, 99% is 2, 99.9% is 3.
fn percentile_label(x: &f64) -> String {
    let pct = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x - 2.0).ceil().max(0.0) as usize;
    format!("{pct:.decimals$}%")
}

/// Latency by percentile, every round of the persistent workload together, one curve per mode.
fn latency(results: &Results, path: &Path) -> Plot {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let curves: Vec<(&ModeResults, Vec<(f64, f64)>)> = results
        .modes
        .iter()
        .filter(|m| !m.latencies.is_empty())
        .map(|m| {
            let h = &m.latencies;
            // Up to the quantile the sample size supports (1/n), at most 99.99%.
            let top = (h.len() as f64).log10().min(4.0);
            let points = (0..=(top * 50.0) as usize)
                .map(|k| {
                    let x = k as f64 / 50.0;
                    let q = 1.0 - 10f64.powf(-x);
                    (x, h.value_at_quantile(q) as f64 / 1000.0)
                })
                .collect();
            (m, points)
        })
        .collect();
    let all = curves.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y));
    let (lo, hi) = all.fold((f64::INFINITY, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if lo.is_finite() {
        (lo * 0.8, hi * 1.25)
    } else {
        (1.0, 10.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption("Persistent connections: round-trip latency by percentile", (FONT, 22))
        .margin(15)
        .margin_right(45)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..4f64, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&percentile_label)
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 15))
        .draw()?;
    for (m, points) in curves {
        let c = color(results, m.mode.name);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(m.mode.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Short connections/s per mode: the median as a bar, the rounds' range as a whisker.
fn connections(results: &Results, path: &Path) -> Plot {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = results.modes.len();
    let top = results.modes.iter().flat_map(|m| m.short_rates()).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Short connections per second (median of rounds, whisker: min–max)",
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(20)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("connections/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 15))
        .draw()?;
    for (i, m) in results.modes.iter().enumerate() {
        let rates = m.short_rates();
        if rates.is_empty() {
            continue;
        }
        let (lo, hi) = rates
            .iter()
            .fold((f64::INFINITY, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let mid = median(rates);
        let (x, c) = (i as f64, color(results, m.mode.name));
        chart.draw_series([Rectangle::new([(x + 0.2, 0.0), (x + 0.8, mid)], c.mix(0.7).filled())])?;
        chart.draw_series([
            PathElement::new(vec![(x + 0.5, lo), (x + 0.5, hi)], BLACK.stroke_width(2)),
            PathElement::new(vec![(x + 0.42, lo), (x + 0.58, lo)], BLACK.stroke_width(2)),
            PathElement::new(vec![(x + 0.42, hi), (x + 0.58, hi)], BLACK.stroke_width(2)),
        ])?;
        chart.draw_series([Text::new(
            format!("{}: {mid:.0}", m.mode.name),
            (x + 0.22, hi + top * 0.07),
            (FONT, 17),
        )])?;
    }
    root.present()?;
    Ok(())
}

/// Scaling: short connections/s against excluded CIDRs (left) and registered namespaces (right).
fn scaling(results: &Results, path: &Path) -> Plot {
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = results
        .cidrs
        .iter()
        .chain(&results.namespaces)
        .flat_map(|s| s.points.iter().flat_map(|p| p.rates.iter().copied()))
        .fold(1.0, f64::max)
        * 1.2;
    let (left, right) = root.split_horizontally(550);
    panel(
        results,
        &left,
        "excluded CIDRs",
        "(-x, log scale)",
        &results.cidrs,
        5000.0,
        top,
    )?;
    panel(
        results,
        &right,
        "registered namespaces",
        "(log scale)",
        &results.namespaces,
        1500.0,
        top,
    )?;
    root.present()?;
    Ok(())
}

fn panel(
    results: &Results,
    area: &DrawingArea<SVGBackend, Shift>,
    axis: &str,
    scale: &str,
    series: &[Series<Point>],
    x_max: f64,
    top: f64,
) -> Plot {
    let mut chart = ChartBuilder::on(area)
        .caption(format!("Short connections/s vs {axis}"), (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8f64..x_max).log_scale(), 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc(format!("{axis} {scale}"))
        .y_desc("connections/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 14))
        .draw()?;
    for s in series {
        let c = color(results, s.mode);
        let points: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x as f64, p.median())).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(s.mode)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
        chart.draw_series(s.points.iter().map(|p| {
            let (lo, hi) = p
                .rates
                .iter()
                .fold((f64::INFINITY, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
            PathElement::new(vec![(p.x as f64, lo), (p.x as f64, hi)], c.stroke_width(1))
        }))?;
    }
    if series.is_empty() {
        chart.draw_series([Text::new("not measured in this run", (2.0, top / 2.0), (FONT, 18))])?;
    } else {
        legend(&mut chart)?;
    }
    Ok(())
}

fn legend<'a, X: Ranged, Y: Ranged>(chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>) -> Plot {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
