//! The steady-rate PNG: throughput (published, stored in MySQL, indexed per
//! second) above, latency by publish second (p50 and p99, publish→row and
//! publish→document, log scale) below. Drawn with plotters' bitmap backend;
//! text is rendered by ab_glyph from a TrueType file read at run time
//! (`--font`, default DejaVu Sans from Debian's fonts-dejavu-core), so no
//! fontconfig or freetype is needed.

use crate::common::*;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;
use std::path::Path;

pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

fn register(font: &Path) -> Res<()> {
    let bytes = std::fs::read(font).ctx(&format!(
        "reading font {} (apt-get install fonts-dejavu-core, or --font FILE)",
        font.display()
    ))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| format!("{}: not a usable TrueType font", font.display()))
}

fn series(v: &Value, key: &str) -> Vec<(f64, f64)> {
    v["series"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let x = p["second"].as_f64()? + 0.5;
                    let y = p[key].as_f64()?;
                    y.is_finite().then_some((x, y))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn draw(v: &Value, path: &Path, font: &Path) -> Res<()> {
    register(font)?;
    let e = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let title = format!(
        "chat-writer steady rate: {} msgs/s for {} s (p99 row {} ms, p99 document {} ms)",
        v["rate"],
        v["secs"],
        fmt_num(v["row"]["p99_ms"].as_f64().unwrap_or(f64::NAN)),
        fmt_num(v["doc"]["p99_ms"].as_f64().unwrap_or(f64::NAN)),
    );
    let root = root.titled(&title, (FONT, 28)).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(470);

    let thr = [
        ("published", "published to RabbitMQ", RGBColor(70, 110, 230)),
        ("stored", "stored in MySQL", RGBColor(0, 150, 60)),
        (
            "indexed",
            "indexed (document visible)",
            RGBColor(230, 120, 0),
        ),
    ];
    let xmax = v["series"].as_array().map(|a| a.len()).unwrap_or(1).max(1) as f64;
    let ymax = thr
        .iter()
        .flat_map(|(k, _, _)| series(v, k))
        .map(|(_, y)| y)
        .fold(1.0, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&top)
        .caption("Throughput per second", (FONT, 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|x| e(&x))?;
    c.configure_mesh()
        .x_desc("seconds since the first publish")
        .y_desc("messages per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .draw()
        .map_err(|x| e(&x))?;
    for (key, label, color) in thr {
        c.draw_series(LineSeries::new(series(v, key), color.stroke_width(3)))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 16))
        .draw()
        .map_err(|x| e(&x))?;

    let lat = [
        (
            "row_p50_ms",
            "publish → row, p50",
            RGBColor(0, 150, 60).mix(0.5),
        ),
        (
            "row_p99_ms",
            "publish → row, p99",
            RGBColor(0, 150, 60).mix(1.0),
        ),
        (
            "doc_p50_ms",
            "publish → document, p50",
            RGBColor(230, 120, 0).mix(0.55),
        ),
        (
            "doc_p99_ms",
            "publish → document, p99",
            RGBColor(230, 120, 0).mix(1.0),
        ),
    ];
    let lmax = lat
        .iter()
        .flat_map(|(k, _, _)| series(v, k))
        .map(|(_, y)| y)
        .fold(10.0, f64::max)
        * 1.5;
    let mut c = ChartBuilder::on(&bottom)
        .caption("Latency by publish second (log scale)", (FONT, 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..xmax, (0.5f64..lmax).log_scale())
        .map_err(|x| e(&x))?;
    c.configure_mesh()
        .x_desc("seconds since the first publish (by publish time)")
        .y_desc("latency, ms")
        .y_label_formatter(&|y| fmt_num(*y))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .draw()
        .map_err(|x| e(&x))?;
    for (key, label, color) in lat {
        let pts: Vec<(f64, f64)> = series(v, key)
            .into_iter()
            .map(|(x, y)| (x, y.max(0.5)))
            .collect();
        let dashed = key.ends_with("p50_ms");
        let style = color.stroke_width(if dashed { 2 } else { 3 });
        c.draw_series(LineSeries::new(pts.clone(), style))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|x| e(&x))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 16))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
