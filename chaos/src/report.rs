//! What a run leaves behind: `report.json` (everything, for machines),
//! `summary.txt` (a few lines for people), `timeline.svg` (faults and
//! calls over time) and `history.jsonl` (every call).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::checker::Finding;
use crate::history::{FaultEvent, Op, Outcome};

/// The whole report.
#[derive(Serialize)]
pub struct Report {
    pub seed: u64,
    pub replicas: usize,
    pub mode: String,
    pub duration_s: f64,
    pub origin_us: u64,
    pub faults: Vec<FaultEvent>,
    pub skipped_faults: Vec<String>,
    pub operations: OpCounts,
    pub findings: Vec<Finding>,
    pub ok: bool,
    pub replay: String,
}

/// How the calls ended.
#[derive(Serialize, Default)]
pub struct OpCounts {
    pub total: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn count(history: &[Op]) -> OpCounts {
    let mut c = OpCounts {
        total: history.len(),
        ..Default::default()
    };
    let mut lat: Vec<u64> = Vec::new();
    for op in history {
        match op.outcome {
            Outcome::Ok { .. } => c.ok += 1,
            Outcome::Fail { .. } => c.fail += 1,
            Outcome::Unknown { .. } => c.unknown += 1,
        }
        if op.is_ok() {
            lat.extend(op.latency());
        }
    }
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .map(|v| *v as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    c.p50_ms = q(0.5);
    c.p99_ms = q(0.99);
    c.max_ms = q(1.0);
    c
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "chaos run, seed {}, {} replicas ({}), {:.0} s: {}",
        r.seed,
        r.replicas,
        r.mode,
        r.duration_s,
        if r.ok { "PASSED" } else { "FAILED" }
    );
    let mut by_class: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &r.faults {
        *by_class.entry(crate::nemesis::class(&f.kind)).or_default() += 1;
    }
    let _ = writeln!(
        s,
        "faults: {} ({})",
        r.faults.len(),
        by_class
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !r.skipped_faults.is_empty() {
        let _ = writeln!(s, "skipped: {}", r.skipped_faults.join("; "));
    }
    let o = &r.operations;
    let _ = writeln!(
        s,
        "calls: {} ({} ok, {} refused, {} unknown); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        o.total, o.ok, o.fail, o.unknown, o.p50_ms, o.p99_ms, o.max_ms
    );
    for f in &r.findings {
        let _ = writeln!(s, "[{}] {}", if f.ok { "ok" } else { "FAIL" }, f.checker);
        for d in f.details.iter().take(8) {
            let _ = writeln!(s, "      {d}");
        }
        if f.details.len() > 8 {
            let _ = writeln!(s, "      ... and {} more", f.details.len() - 8);
        }
    }
    let _ = writeln!(s, "replay: {}", r.replay);
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The timeline: one lane per caller with its calls (green ok, orange
/// refused, red unknown), faults as shaded bands, and the latency of each
/// answered call below.
pub fn timeline_svg(history: &[Op], faults: &[FaultEvent], origin: u64, end: u64) -> String {
    let mut lanes: Vec<&str> = history.iter().map(|o| o.process.as_str()).collect();
    lanes.sort_unstable();
    lanes.dedup();
    let (left, width, lane_h) = (150.0, 1400.0, 14.0);
    let lanes_h = lanes.len() as f64 * lane_h;
    let plot_top = 40.0 + lanes_h + 30.0;
    let plot_h = 160.0;
    let height = plot_top + plot_h + 40.0;
    let span = (end.saturating_sub(origin)).max(1) as f64;
    let x = |t: u64| left + (t.saturating_sub(origin) as f64 / span) * width;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="10">"#,
        left + width + 20.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="13">faults (bands) and calls: green ok, orange refused, red no answer; {:.0} s</text>"#,
        span / 1e6
    );
    for f in faults {
        let x0 = x(f.start);
        let x1 = x(f.healed.unwrap_or(end)).max(x0 + 1.0);
        let color = match crate::nemesis::class(&f.kind) {
            "kill" => "#f4cccc",
            "pause" => "#fce5cd",
            "partition" => "#cfe2f3",
            "link" => "#d9ead3",
            _ => "#e6e6e6",
        };
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.1}" y="30" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}</title></rect>"#,
            x1 - x0,
            plot_top + plot_h - 30.0,
            esc(&f.kind),
            esc(&f.detail)
        );
        let _ = writeln!(
            s,
            r#"<text x="{x0:.1}" y="38" font-size="8" transform="rotate(0)">{}</text>"#,
            esc(&f.kind)
        );
    }
    for (i, lane) in lanes.iter().enumerate() {
        let y = 40.0 + i as f64 * lane_h;
        let _ = writeln!(s, r#"<text x="5" y="{:.1}">{}</text>"#, y + 10.0, esc(lane));
        for op in history.iter().filter(|o| o.process == *lane) {
            let color = match op.outcome {
                Outcome::Ok { .. } => "#38761d",
                Outcome::Fail { .. } => "#e69138",
                Outcome::Unknown { .. } => "#cc0000",
            };
            let x0 = x(op.invoked);
            let x1 = x(op.completed.unwrap_or(end)).max(x0 + 0.8);
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                y + 2.0,
                x1 - x0,
                lane_h - 4.0
            );
        }
    }
    // Latency plot (log scale from 1 ms to 10 s).
    let _ = writeln!(
        s,
        r#"<text x="5" y="{:.1}">latency (log, 1 ms to 10 s)</text>"#,
        plot_top + plot_h / 2.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{plot_top}" width="{width}" height="{plot_h}" fill="none" stroke="#999"/>"##
    );
    let y_of = |us: u64| {
        let ms = (us as f64 / 1000.0).clamp(1.0, 10_000.0);
        plot_top + plot_h - (ms.log10() / 4.0) * plot_h
    };
    for ms in [1u64, 10, 100, 1000, 10000] {
        let y = y_of(ms * 1000);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}">{ms} ms</text>"##,
            left + width,
            left - 40.0,
            y + 3.0
        );
    }
    for op in history.iter().filter(|o| o.is_ok()) {
        if let Some(l) = op.latency() {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="1.2" fill="#3d85c6"/>"##,
                x(op.invoked),
                y_of(l)
            );
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// Writes the report files into `dir`.
pub fn write(dir: &Path, report: &Report, history: &[Op], end: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    std::fs::write(dir.join("summary.txt"), summary(report))?;
    std::fs::write(
        dir.join("timeline.svg"),
        timeline_svg(history, &report.faults, report.origin_us, end),
    )?;
    let mut lines = String::new();
    for op in history {
        lines.push_str(&serde_json::to_string(op)?);
        lines.push('\n');
    }
    std::fs::write(dir.join("history.jsonl"), lines)?;
    Ok(())
}
