//! Charts of a run as SVG files (`mesh-bench charts`, `mesh-bench run --charts`): each mesh
//! step against no mesh, the round-trip latency percentiles of every step, and the restart
//! scenario's failures.
//!
//! The figures come from the functions the markdown report uses ([`report::median`],
//! [`report::spread`], [`report::ratio_of`], [`StepResult::baseline`]). What a chart shows is
//! computed apart from the drawing ([`ratio_groups`], [`latency_lines`]), so it can be checked
//! against the tables. The SVG names the generic `sans-serif` family and the viewer picks the
//! face: no font is read, and the sizes the layout reserves for labels are estimates.
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{self, PERCENTILES, RATIOS, Report, StepResult};
use super::restart::RestartResult;

/// The measurements of the ratio chart (keys of [`RATIOS`]).
pub const RATIO_KEYS: [&str; 2] = ["bulk_mb_s", "1kb_max_per_s"];

/// The series of the latency chart (a key prefix of [`report::LATENCY`]).
pub const LATENCY_SERIES: &str = "1kb_fixed";

/// The files, in the order [`render`] returns them.
pub const RATIOS_SVG: &str = "ratios.svg";
pub const LATENCY_SVG: &str = "latency.svg";
pub const RESTARTS_SVG: &str = "restarts.svg";

/// The charts' titles.
pub const RATIOS_TITLE: &str = "Throughput and request rate of each mesh step against no mesh";
pub const LATENCY_TITLE: &str = "Round-trip latency of 1 KB requests at the fixed rate";
pub const RESTARTS_TITLE: &str = "Failures while the client's node agent goes away";

/// What failed while drawing or writing the charts.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("draw {chart}")]
    Draw {
        chart: &'static str,
        #[source]
        source: DrawingAreaErrorKind<std::io::Error>,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("create directory {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type DrawError = DrawingAreaErrorKind<std::io::Error>;
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A step's name on the charts: its number and key (`5 ebpf-skmsg`).
pub fn label(step: &StepResult) -> String {
    format!("{} {}", step.id, step.key)
}

// === ratios ===

/// One bar of the ratio chart, against the no-mesh median of the step's topology: the step's
/// median (the markdown report's ratio) and, as the whisker, its lowest and highest
/// repetition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    pub median: f64,
    pub low: f64,
    pub high: f64,
}

/// A mesh step's bars in the ratio chart.
#[derive(Debug, Clone, PartialEq)]
pub struct RatioGroup {
    pub step: u8,
    /// The no-mesh step it is judged against ([`StepResult::baseline`]).
    pub baseline: u8,
    pub label: String,
    /// Per [`RATIO_KEYS`]; `None` where either step lacks the measurement.
    pub ratios: [Option<Ratio>; 2],
}

/// Every mesh step that has its no-mesh step in the run and a ratio to show.
pub fn ratio_groups(report: &Report) -> Vec<RatioGroup> {
    report
        .steps
        .iter()
        .filter(|s| s.datapath.mesh)
        .filter_map(|s| {
            let base = report.step(s.baseline())?;
            let ratios = RATIO_KEYS.map(|k| ratio(s, base, k));
            ratios.iter().any(Option::is_some).then(|| RatioGroup {
                step: s.id,
                baseline: base.id,
                label: label(s),
                ratios,
            })
        })
        .collect()
}

fn ratio(step: &StepResult, base: &StepResult, key: &str) -> Option<Ratio> {
    let against = base.median(key);
    let (lo, hi) = report::spread(step.values.get(key)?)?;
    Some(Ratio {
        median: report::ratio_of(step.median(key), against)?,
        low: report::ratio_of(Some(lo), against)?,
        high: report::ratio_of(Some(hi), against)?,
    })
}

// === latency ===

/// One line of the latency chart: a step's round-trip percentiles, µs.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyLine {
    pub step: u8,
    pub label: String,
    pub mesh: bool,
    /// Per [`PERCENTILES`], the median over the repetitions; `None` where not measured (or
    /// zero, which a log scale cannot show).
    pub micros: [Option<f64>; 4],
}

/// Every step with a percentile of [`LATENCY_SERIES`].
pub fn latency_lines(report: &Report) -> Vec<LatencyLine> {
    report
        .steps
        .iter()
        .filter_map(|s| {
            let micros = PERCENTILES.map(|(p, _)| {
                s.median(&format!("{LATENCY_SERIES}_{p}"))
                    .filter(|v| *v > 0.0)
            });
            micros.iter().any(Option::is_some).then(|| LatencyLine {
                step: s.id,
                label: label(s),
                mesh: s.datapath.mesh,
                micros,
            })
        })
        .collect()
}

// === writing ===

/// Every chart the report has something for: file name and SVG document.
pub fn render(report: &Report) -> Result<Vec<(&'static str, String)>, ChartError> {
    let mut out = Vec::new();
    let groups = ratio_groups(report);
    if !groups.is_empty() {
        out.push((RATIOS_SVG, svg(RATIOS_SVG, |a| ratios(a, report, &groups))?));
    }
    let lines = latency_lines(report);
    if !lines.is_empty() {
        out.push((
            LATENCY_SVG,
            svg(LATENCY_SVG, |a| latency(a, report, &lines))?,
        ));
    }
    if !report.restarts.is_empty() {
        out.push((
            RESTARTS_SVG,
            svg(RESTARTS_SVG, |a| restarts(a, report, &report.restarts))?,
        ));
    }
    Ok(out)
}

/// Writes the charts into `dir` (made if missing) and returns the files written.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, ChartError> {
    if dir.exists() && !dir.is_dir() {
        return Err(ChartError::NotADirectory(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(|source| ChartError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, doc) in render(report)? {
        let path = dir.join(name);
        std::fs::write(&path, doc).map_err(|source| ChartError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

// === drawing ===

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 600;
/// The legend's column, right of the plot.
const LEGEND_WIDTH: u32 = 220;
const FONT: &str = "sans-serif";

fn svg(
    chart: &'static str,
    draw: impl FnOnce(&Area) -> Result<(), DrawError>,
) -> Result<String, ChartError> {
    let mut doc = String::new();
    {
        let root = SVGBackend::with_string(&mut doc, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root)
            .and_then(|()| root.present())
            .map_err(|source| ChartError::Draw { chart, source })?;
    }
    Ok(doc)
}

/// The run a chart shows, for its subtitle.
fn run(report: &Report) -> String {
    let e = &report.environment;
    format!(
        "{} run of {}, {} build at {}",
        report.plan.name,
        e.started.get(..10).unwrap_or(&e.started),
        e.build_profile,
        e.git_revision,
    )
}

/// Title and subtitle lines; returns the area below them.
fn header<'a>(root: &Area<'a>, title: &str, notes: &[&str]) -> Result<Area<'a>, DrawError> {
    root.fill(&WHITE)?;
    let mut area = root.titled(title, (FONT, 24).into_font().style(FontStyle::Bold))?;
    for note in notes {
        area = area.titled(note, (FONT, 15).into_font().color(&GREY))?;
    }
    Ok(area)
}

const GREY: RGBColor = RGBColor(90, 90, 90);

/// The measurements' colours (bars), and the steps' (lines).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn step_color(id: u8) -> RGBColor {
    COLORS[usize::from(id) % COLORS.len()]
}

#[derive(Clone, Copy)]
enum Mark {
    Bar,
    Line,
    Dashed,
    Whisker,
}

/// The legend, in its own column so it never hides a line or a bar.
fn legend(area: &Area, entries: &[(String, RGBColor, Mark)]) -> Result<(), DrawError> {
    let text = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (y, (name, color, mark)) in (40..).step_by(26).zip(entries) {
        let (x0, x1) = (10, 38);
        match mark {
            Mark::Bar => area.draw(&Rectangle::new(
                [(x0 + 4, y - 7), (x1 - 4, y + 7)],
                color.filled(),
            ))?,
            Mark::Line => {
                area.draw(&PathElement::new(
                    vec![(x0, y), (x1, y)],
                    color.stroke_width(2),
                ))?;
                area.draw(&Circle::new((x0 + 14, y), 4, color.filled()))?;
            }
            Mark::Dashed => {
                for x in (x0..x1).step_by(8) {
                    area.draw(&PathElement::new(
                        vec![(x, y), (x + 5, y)],
                        color.stroke_width(2),
                    ))?;
                }
            }
            Mark::Whisker => {
                let x = x0 + 14;
                area.draw(&PathElement::new(
                    vec![(x, y - 8), (x, y + 8)],
                    color.stroke_width(1),
                ))?;
                for yy in [y - 8, y + 8] {
                    area.draw(&PathElement::new(
                        vec![(x - 4, yy), (x + 4, yy)],
                        color.stroke_width(1),
                    ))?;
                }
            }
        }
        area.draw(&Text::new(name.clone(), (x1 + 8, y), text.clone()))?;
    }
    Ok(())
}

/// One bar: its value and, optionally, a whisker.
#[derive(Clone, Copy)]
struct Bar {
    value: f64,
    whisker: Option<(f64, f64)>,
}

/// A grouped bar chart: a group per x label, a bar per series in each.
struct Bars<'a> {
    groups: Vec<String>,
    /// Name, colour and a bar per group.
    series: Vec<(String, RGBColor, Vec<Option<Bar>>)>,
    x_desc: &'a str,
    y_desc: &'a str,
    /// How the bars' values are written above them.
    value: fn(f64) -> String,
    /// A dashed horizontal line (1.0 on the ratio chart).
    reference: Option<f64>,
}

fn bars(area: &Area, b: &Bars) -> Result<(), DrawError> {
    let (plot, side) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    let top = b
        .series
        .iter()
        .flat_map(|(_, _, v)| v.iter().flatten())
        .map(Bar::top)
        .chain(b.reference)
        .fold(1.0, f64::max)
        * 1.15;
    let end = slot(b.groups.len()) - SLOT / 2;
    let x = (-SLOT / 2..end).with_key_points((0..b.groups.len()).map(slot).collect());
    let mut chart = ChartBuilder::on(&plot)
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(65)
        .build_cartesian_2d(x, 0.0..top)?;
    let groups = &b.groups;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|x| at_slot(groups, *x).cloned().unwrap_or_default())
        .y_label_formatter(&|y| tidy(*y))
        .x_desc(b.x_desc)
        .y_desc(b.y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()?;
    // The bars of a group share 80% of its slot.
    let width = SLOT * 4 / 5 / i32::try_from(b.series.len()).unwrap_or(1).max(1);
    let above = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (k, (_, color, values)) in (0..).zip(&b.series) {
        let left = width * k - SLOT * 2 / 5;
        let placed = || {
            (0..)
                .zip(values)
                .filter_map(move |(i, bar)| bar.map(|bar| (slot(i) + left, bar)))
        };
        chart.draw_series(placed().map(|(x0, bar)| {
            Rectangle::new([(x0 + 1, 0.0), (x0 + width - 1, bar.value)], color.filled())
        }))?;
        for (x0, bar) in placed() {
            let x = x0 + width / 2;
            if let Some((lo, hi)) = bar.whisker {
                let cap = width / 6;
                chart.draw_series(
                    [
                        vec![(x, lo), (x, hi)],
                        vec![(x - cap, lo), (x + cap, lo)],
                        vec![(x - cap, hi), (x + cap, hi)],
                    ]
                    .map(|path| PathElement::new(path, BLACK.stroke_width(1))),
                )?;
            }
            chart.draw_series(std::iter::once(
                EmptyElement::at((x, bar.top()))
                    + Text::new((b.value)(bar.value), (0, -4), above.clone()),
            ))?;
        }
    }
    if let Some(y) = b.reference {
        chart.draw_series(DashedLineSeries::new(
            [(-SLOT / 2, y), (end, y)],
            8,
            5,
            BLACK.stroke_width(1),
        ))?;
    }
    let mut entries: Vec<(String, RGBColor, Mark)> = b
        .series
        .iter()
        .map(|(name, color, _)| (name.clone(), *color, Mark::Bar))
        .collect();
    let whiskers = b.series.iter().flat_map(|(_, _, v)| v.iter().flatten());
    if whiskers.clone().any(|bar| bar.whisker.is_some()) {
        entries.push(("lowest..highest rep".into(), BLACK, Mark::Whisker));
    }
    if let Some(y) = b.reference {
        entries.push((format!("{y:.1} = no mesh"), BLACK, Mark::Dashed));
    }
    legend(&side, &entries)
}

impl Bar {
    /// Where the bar or its whisker ends.
    fn top(&self) -> f64 {
        self.whisker.map_or(self.value, |w| w.1.max(self.value))
    }
}

/// The width of one group (or one percentile) on an x axis of integers: the groups are
/// centred on multiples of it.
const SLOT: i32 = 100;

/// The centre of the `i`th slot.
fn slot(i: usize) -> i32 {
    i32::try_from(i).map_or(i32::MAX, |i| i.saturating_mul(SLOT))
}

/// The item whose slot is centred on `x`.
fn at_slot<T>(items: &[T], x: i32) -> Option<&T> {
    if x % SLOT != 0 {
        return None;
    }
    items.get(usize::try_from(x / SLOT).ok()?)
}

fn ratios(area: &Area, report: &Report, groups: &[RatioGroup]) -> Result<(), DrawError> {
    let run = run(report);
    let area = header(
        area,
        RATIOS_TITLE,
        &[
            &run,
            &format!(
                "bars: the step's median / the no-mesh median of its topology (the report's \
                 ratios, {} repetitions); whiskers: the step's lowest and highest / that median",
                report.plan.reps
            ),
        ],
    )?;
    let series = RATIO_KEYS
        .iter()
        .enumerate()
        .map(|(k, key)| {
            let heading = RATIOS
                .iter()
                .find(|(rk, _)| rk == key)
                .map_or(*key, |(_, h)| h);
            let values = groups
                .iter()
                .map(|g| {
                    g.ratios[k].map(|r| Bar {
                        value: r.median,
                        whisker: Some((r.low, r.high)),
                    })
                })
                .collect();
            (heading.to_string(), COLORS[k], values)
        })
        .collect();
    bars(
        &area,
        &Bars {
            groups: groups.iter().map(|g| g.label.clone()).collect(),
            series,
            x_desc: "mesh step, against no mesh on the same node (step 1) or across nodes (step 2)",
            y_desc: "ratio to no mesh (higher is better)",
            value: |v| format!("{v:.2}"),
            reference: Some(1.0),
        },
    )
}

fn restarts(area: &Area, report: &Report, results: &[RestartResult]) -> Result<(), DrawError> {
    let run = run(report);
    let area = header(
        area,
        RESTARTS_TITLE,
        &[
            &run,
            "node-1's agent restarted, replaced or killed under load; counted from touching the \
             agent until 1 s after the new one serves",
        ],
    )?;
    let count = |f: fn(&RestartResult) -> u64| {
        results
            .iter()
            .map(|r| {
                Some(Bar {
                    value: f(r) as f64,
                    whisker: None,
                })
            })
            .collect()
    };
    bars(
        &area,
        &Bars {
            groups: results.iter().map(|r| r.key.clone()).collect(),
            series: vec![
                (
                    "new connections".into(),
                    COLORS[3],
                    count(|r| r.failed_connections),
                ),
                (
                    "HTTP requests".into(),
                    COLORS[4],
                    count(|r| r.failed_requests),
                ),
            ],
            x_desc: "how the agent goes (restart scenario)",
            y_desc: "failed (count)",
            value: |v| format!("{v:.0}"),
            reference: None,
        },
    )
}

fn latency(area: &Area, report: &Report, lines: &[LatencyLine]) -> Result<(), DrawError> {
    let run = run(report);
    let rate = format!(
        "{} requests/s for {} ms, timed from the intended send; medians over the {} \
         repetitions",
        report.plan.fixed_rate, report.plan.fixed_ms, report.plan.reps
    );
    let area = header(area, LATENCY_TITLE, &[&run, &rate])?;
    let (plot, side) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    let values = || {
        lines
            .iter()
            .flat_map(|l| l.micros.iter().flatten().copied())
    };
    let lo = values().fold(f64::INFINITY, f64::min) / 1.4;
    let hi = values().fold(0.0, f64::max) * 1.4;
    let x = (-SLOT / 4..slot(PERCENTILES.len() - 1) + SLOT / 4)
        .with_key_points((0..PERCENTILES.len()).map(slot).collect());
    let y = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
    let mut chart = ChartBuilder::on(&plot)
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| at_slot(&PERCENTILES, *x).map_or_else(String::new, |p| p.1.into()))
        .y_label_formatter(&|v| micros(*v))
        .x_desc("percentile")
        .y_desc("round-trip latency (log scale)")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()?;
    let mut entries = Vec::new();
    for l in lines {
        let color = step_color(l.step);
        let points: Vec<(i32, f64)> = l
            .micros
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (slot(i), v)))
            .collect();
        if l.mesh {
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        } else {
            chart.draw_series(DashedLineSeries::new(
                points.clone(),
                8,
                5,
                color.stroke_width(2),
            ))?;
        }
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        let mark = if l.mesh { Mark::Line } else { Mark::Dashed };
        let name = if l.mesh {
            l.label.clone()
        } else {
            format!("{} (no mesh)", l.label)
        };
        entries.push((name, color, mark));
    }
    legend(&side, &entries)
}

/// Ticks of a log axis from `lo` to `hi`: 1, 2 and 5 of each decade, or only the powers of
/// ten when those would crowd the axis.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        ticks.extend(
            [1.0, 2.0, 5.0]
                .map(|m| m * decade)
                .iter()
                .filter(|t| (lo..=hi).contains(*t)),
        );
        decade *= 10.0;
    }
    if ticks.len() > 10 {
        ticks.retain(|t: &f64| (t.log10() - t.log10().round()).abs() < 1e-9);
    }
    ticks
}

/// A latency in µs as the axis writes it: `50 µs`, `2 ms`, `1 s`.
fn micros(v: f64) -> String {
    if v >= 1e6 {
        format!("{} s", tidy(v / 1e6))
    } else if v >= 1e3 {
        format!("{} ms", tidy(v / 1e3))
    } else {
        format!("{} µs", tidy(v))
    }
}

/// A tick's value with at most three decimals and no trailing zeros (`0.3`, not
/// `0.30000000000000004`).
fn tidy(v: f64) -> String {
    format!("{}", (v * 1000.0).round() / 1000.0)
}

#[cfg(test)]
mod tests;
