//! SVG plots of the suite's results (plotters, SVG backend: no fonts or
//! system libraries needed, and the files diff as text).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::Row;

fn colour(tool: &str) -> RGBColor {
    match tool {
        "cbtvault" => RGBColor(31, 119, 180),
        "restic" => RGBColor(255, 127, 14),
        "borg" => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

/// Wall time of every step at one disk size, one bar each, on a log scale
/// (an incremental and a full backup differ a hundredfold).
pub fn times(path: &Path, size: u64, rows: &[Row]) -> Result<()> {
    let bars: Vec<&Row> = rows.iter().filter(|r| r.size_gib == size).collect();
    let n = bars.len().max(1) as i32;
    let max = bars
        .iter()
        .map(|r| r.outcome.cost.wall_s)
        .fold(0.1, f64::max)
        * 2.0;
    let min = bars
        .iter()
        .map(|r| r.outcome.cost.wall_s)
        .fold(max, f64::min)
        .max(1e-3)
        / 2.0;
    let root = SVGBackend::new(path, (900, 60 + 22 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{size} GiB disk: wall time per step (log scale)"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d((min..max).log_scale(), (0..n).into_segmented())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .y_labels(n as usize)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map(|r| format!("{} · {} ({})", r.step, r.tool, r.path))
                .unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("seconds")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, r)| {
            let i = i as i32;
            Rectangle::new(
                [
                    (min, SegmentValue::Exact(i)),
                    (r.outcome.cost.wall_s.max(min), SegmentValue::Exact(i + 1)),
                ],
                colour(r.tool).filled(),
            )
        }))
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// How cbtvault's time and peak memory follow the disk's size, beside
/// restic's full backup.
pub fn scaling(path: &Path, sizes: &[u64], rows: &[Row]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (left, right) = root.split_horizontally(450);
    let series = |tool: &str, step: &str, f: &dyn Fn(&Row) -> f64| -> Vec<(f64, f64)> {
        sizes
            .iter()
            .filter_map(|&s| {
                rows.iter()
                    .find(|r| {
                        r.size_gib == s && r.path == "file" && r.tool == tool && r.step == step
                    })
                    .map(|r| (s as f64, f(r)))
            })
            .collect()
    };
    let wall = |r: &Row| r.outcome.cost.wall_s;
    let rss = |r: &Row| (r.outcome.cost.rss_kib >> 10) as f64;
    let xmax = sizes.iter().copied().max().unwrap_or(1) as f64 * 1.5;
    let xmin = sizes.iter().copied().min().unwrap_or(1) as f64 / 1.5;
    let lines = [
        ("cbtvault", "full"),
        ("restic", "full"),
        ("cbtvault", "same change"),
        ("cbtvault", "restore"),
    ];
    let all: Vec<Vec<(f64, f64)>> = lines.iter().map(|(t, s)| series(t, s, &wall)).collect();
    let ymax = all.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 2.0;
    let ymin = all
        .iter()
        .flatten()
        .map(|p| p.1)
        .fold(ymax, f64::min)
        .max(1e-3)
        / 2.0;
    let mut chart = ChartBuilder::on(&left)
        .caption("wall time against disk size", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("disk GiB")
        .y_desc("seconds")
        .draw()
        .map_err(plot_error)?;
    for (i, ((tool, step), points)) in lines.iter().zip(all).enumerate() {
        let style = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(plot_error)?
            .label(format!("{tool} {step}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], Palette99::pick(i)));
    }
    legend(&mut chart)?;
    let mem = [("cbtvault", "full"), ("cbtvault", "restore")];
    let mut chart = ChartBuilder::on(&right)
        .caption("cbtvault peak RSS (target 128 MiB)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..256f64)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("disk GiB")
        .y_desc("MiB")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(
            vec![(xmin, 128.0), (xmax, 128.0)],
            RED.stroke_width(1),
        ))
        .map_err(plot_error)?;
    for (i, (tool, step)) in mem.iter().enumerate() {
        chart
            .draw_series(LineSeries::new(
                series(tool, step, &rss),
                Palette99::pick(i).stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(format!("{tool} {step}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], Palette99::pick(i)));
    }
    legend(&mut chart)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Draws the series' legend in the chart's corner.
fn legend<'a, X, Y>(chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}
