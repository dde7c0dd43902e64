use super::*;

/// A run committed under `benches/results/`.
fn committed(name: &str) -> Report {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../benches/results")
        .join(name);
    let text = std::fs::read(&path).expect("the committed run is readable");
    serde_json::from_slice(&text).expect("the committed run is a ladder report")
}

fn full() -> Report {
    committed("full-2026-11-24.json")
}

/// `report` with only the steps `ids` and no restart results.
fn only(report: &Report, ids: &[u8]) -> Report {
    let mut r = report.clone();
    r.steps.retain(|s| ids.contains(&s.id));
    r.restarts.clear();
    r
}

fn cells(line: &str) -> Vec<&str> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect()
}

/// The cell under `heading` in the row `(step/base)` of the markdown ratios table.
fn markdown_ratio(report: &Report, step: u8, base: u8, heading: &str) -> String {
    let md = report.ratios();
    let head = md
        .lines()
        .find(|l| l.starts_with("| comparison |"))
        .expect("the ratios table has a heading");
    let column = cells(head)
        .iter()
        .position(|h| *h == heading)
        .expect("the ratios table has the column");
    let row = md
        .lines()
        .find(|l| l.contains(&format!("({step}/{base}) |")))
        .expect("the ratios table has the step's row");
    cells(row)[column].to_string()
}

/// The texts of an SVG document, unescaped (plotters writes each on its own line inside
/// `<text>`).
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| t.split_once(">\n")?.1.split_once("\n</text>"))
        .map(|(text, _)| {
            text.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&")
        })
        .collect()
}

/// Whether `shown` has the text `text`.
fn has(shown: &[String], text: &str) -> bool {
    shown.iter().any(|t| t == text)
}

fn well_formed(svg: &str) {
    assert!(svg.starts_with("<svg"), "an SVG document: {}", &svg[..40]);
    assert!(svg.trim_end().ends_with("</svg>"), "the document is closed");
    assert_eq!(
        svg.matches("<text").count(),
        svg.matches("</text>").count(),
        "every text is closed"
    );
}

#[test]
fn the_ratio_bars_are_the_reports_ratios() {
    let report = full();
    let groups = ratio_groups(&report);
    let steps: Vec<(u8, u8)> = groups.iter().map(|g| (g.step, g.baseline)).collect();
    assert_eq!(
        steps,
        [(3, 1), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2), (9, 1)],
        "every mesh step, against no mesh of its topology"
    );
    for g in &groups {
        for (k, key) in RATIO_KEYS.iter().enumerate() {
            let heading = RATIOS
                .iter()
                .find(|(rk, _)| rk == key)
                .expect("a key of the ratios table")
                .1;
            let r = g.ratios[k].expect("the full run measured both");
            assert_eq!(
                format!("{:.2}x", r.median),
                markdown_ratio(&report, g.step, g.baseline, heading),
                "step {} {heading}",
                g.step
            );
            assert!(
                r.low < r.median && r.median < r.high,
                "step {} {heading}: {r:?} spans the repetitions",
                g.step
            );
        }
    }
    // As the committed markdown report has it: mesh vs no mesh on one node, 0.51x throughput.
    let five = groups.iter().find(|g| g.step == 5).expect("step 5");
    assert_eq!(five.label, "5 ebpf-skmsg");
    assert_eq!(
        format!("{:.2}", five.ratios[0].expect("throughput").median),
        "0.51"
    );
}

#[test]
fn the_charts_of_the_full_run_name_every_step() {
    let report = full();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let written = write(&report, dir.path()).expect("the charts are written");
    assert_eq!(
        written,
        [dir.path().join(RATIOS_SVG), dir.path().join(LATENCY_SVG)],
        "no restart chart: the full run has no restart results"
    );

    let ratios = std::fs::read_to_string(&written[0]).expect("ratios.svg");
    well_formed(&ratios);
    let shown = texts(&ratios);
    assert!(has(&shown, RATIOS_TITLE), "the title: {shown:?}");
    for label in [
        "3 iptables",
        "5 ebpf-skmsg",
        "6 hbone",
        "8 grpc",
        "9 same-node-hbone",
    ] {
        assert!(has(&shown, label), "{label} in {shown:?}");
    }
    assert!(!has(&shown, "1 same-node"), "no bar for a no-mesh step");
    for g in ratio_groups(&report) {
        for r in g.ratios.iter().flatten() {
            let value = format!("{:.2}", r.median);
            assert!(has(&shown, &value), "{value} on {}", g.label);
        }
    }

    let latency = std::fs::read_to_string(&written[1]).expect("latency.svg");
    well_formed(&latency);
    let shown = texts(&latency);
    assert!(has(&shown, LATENCY_TITLE), "the title: {shown:?}");
    for s in &report.steps {
        let label = label(s);
        assert!(
            shown.iter().any(|t| t.starts_with(&label)),
            "{label} in the legend: {shown:?}"
        );
    }
    for (_, p) in PERCENTILES {
        assert!(has(&shown, p), "{p} on the axis");
    }
}

#[test]
fn the_latency_lines_are_the_medians_of_the_repetitions() {
    let report = full();
    let lines = latency_lines(&report);
    assert_eq!(
        lines.len(),
        report.steps.len(),
        "every step measured latency"
    );
    for (line, step) in lines.iter().zip(&report.steps) {
        assert_eq!(line.step, step.id);
        assert_eq!(line.mesh, step.datapath.mesh);
        for (i, (p, _)) in PERCENTILES.iter().enumerate() {
            assert_eq!(
                line.micros[i],
                report::median(&step.values[&format!("1kb_fixed_{p}")]),
                "step {} {p}",
                step.id
            );
        }
    }
}

#[test]
fn a_run_without_mesh_steps_has_no_ratio_chart() {
    let report = only(&full(), &[1, 2]);
    assert!(ratio_groups(&report).is_empty());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let written = write(&report, dir.path()).expect("the charts are written");
    assert_eq!(written, [dir.path().join(LATENCY_SVG)]);
    assert!(!dir.path().join(RATIOS_SVG).exists());
}

#[test]
fn missing_steps_leave_out_only_what_they_would_show() {
    let full = full();

    let report = only(&full, &[2, 6]);
    let groups = ratio_groups(&report);
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].step, groups[0].baseline), (6, 2));
    let charts = render(&report).expect("the charts are drawn");
    let names: Vec<&str> = charts.iter().map(|c| c.0).collect();
    assert_eq!(names, [RATIOS_SVG, LATENCY_SVG]);
    let shown = texts(&charts[0].1);
    assert!(has(&shown, "6 hbone"));
    assert!(!has(&shown, "5 ebpf-skmsg"));

    // Mesh steps without their no-mesh step: nothing to divide by.
    let report = only(&full, &[5, 6]);
    let names: Vec<&str> = render(&report)
        .expect("the charts are drawn")
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(names, [LATENCY_SVG]);

    let dir = tempfile::tempdir().expect("a temporary directory");
    let nothing = write(&only(&full, &[]), dir.path()).expect("nothing to write is no error");
    assert!(nothing.is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path())
            .expect("the directory")
            .count(),
        0,
        "no empty chart is written"
    );
}

#[test]
fn the_restart_chart_counts_failed_connections() {
    let report = committed("fast-2026-12-07.json");
    let charts = render(&report).expect("the charts are drawn");
    let (name, svg) = charts.last().expect("charts");
    assert_eq!(*name, RESTARTS_SVG);
    well_formed(svg);
    let shown = texts(svg);
    assert!(has(&shown, RESTARTS_TITLE), "the title: {shown:?}");
    for r in &report.restarts {
        assert!(has(&shown, &r.key), "{} in {shown:?}", r.key);
        let failed = r.failed_connections.to_string();
        assert!(has(&shown, &failed), "{failed} in {shown:?}");
    }
}

#[test]
fn charts_go_only_into_a_directory() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("report.json");
    std::fs::write(&file, "{}").expect("a file");
    let err = write(&full(), &file).expect_err("a file is not a directory");
    assert!(matches!(err, ChartError::NotADirectory(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{} is not a directory", file.display())
    );

    // A missing directory is made.
    let new = dir.path().join("charts");
    let written = write(&full(), &new).expect("the charts are written");
    assert_eq!(written.len(), 2);
}

#[test]
fn latency_axis_ticks_and_labels() {
    assert_eq!(log_ticks(40.0, 800_000.0), [100.0, 1e3, 1e4, 1e5]);
    assert_eq!(log_ticks(40.0, 700.0), [50.0, 100.0, 200.0, 500.0]);
    assert_eq!(micros(50.0), "50 µs");
    assert_eq!(micros(2_000.0), "2 ms");
    assert_eq!(micros(500_000.0), "500 ms");
    assert_eq!(micros(1_000_000.0), "1 s");
    assert_eq!(tidy(0.1 * 3.0), "0.3");
}
