//! Reports as pictures: `plot.curves` draws learning curves (CSV files such as
//! `eval.curve` writes) into one PNG chart.

pub mod chart;

use crate::fsutil::atomic_write;
use crate::image_io::encode_png;
use chart::{Chart, Series};
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::path::Path;
use std::sync::Arc;

/// Up to this many curves in one chart, each its own input so that a workflow can
/// wire the nodes that write them (and so run them first).
const CURVES: usize = 4;

pub struct PlotCurves {
    spec: NodeSpec,
}

impl PlotCurves {
    fn new() -> Self {
        let mut spec = NodeSpec::new("plot.curves", 1)
            .category("training")
            .output_node()
            .describe(
                "Draws learning curves into a PNG line chart: each CSV file (a header row, then numbers; \
                 `eval.curve` writes them) is one line of `column` against `x` (by default accuracy \
                 against training steps). An optional dashed line marks a goal.",
            );
        for i in 1..=CURVES {
            let input = InputSpec::new(&format!("curve{i}"), PortType::Path)
                .describe("A CSV file of the curve to draw.");
            spec = spec.input(if i == 1 { input } else { input.optional() });
        }
        spec = spec
            .input(
                InputSpec::new("labels", PortType::list_of(PortType::String))
                    .optional()
                    .describe("Legend labels in curve order; by default the files' names."),
            )
            .input(InputSpec::new("column", PortType::String).default("all"))
            .input(InputSpec::new("x", PortType::String).default("step"))
            .input(InputSpec::new("title", PortType::String).default(""))
            .input(InputSpec::new("x_label", PortType::String).default("training steps"))
            .input(InputSpec::new("y_label", PortType::String).default("accuracy"))
            .input(
                InputSpec::new("goal", PortType::Float)
                    .optional()
                    .describe("Draw a dashed line at this value."),
            )
            .input(InputSpec::new("out", PortType::Path).describe("The PNG file to write."))
            .output("path", PortType::Path, "the PNG written");
        PlotCurves { spec }
    }
}

/// The (x, column) pairs of a CSV file with a header row.
pub fn read_curve(path: &Path, x: &str, column: &str) -> Result<Vec<(f64, f64)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{}: empty file", path.display()))?
        .split(',')
        .map(str::trim)
        .collect();
    let find = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| {
            format!(
                "{}: no column `{name}` (columns: {})",
                path.display(),
                header.join(", ")
            )
        })
    };
    let (xi, yi) = (find(x)?, find(column)?);
    lines
        .enumerate()
        .map(|(n, line)| {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            let number = |i: usize| {
                cells
                    .get(i)
                    .and_then(|c| c.parse::<f64>().ok())
                    .ok_or_else(|| {
                        format!(
                            "{}:{}: not a number in column {}",
                            path.display(),
                            n + 2,
                            i + 1
                        )
                    })
            };
            Ok((number(xi)?, number(yi)?))
        })
        .collect()
}

impl Node for PlotCurves {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let labels: Vec<String> = match inputs.get("labels") {
            Some(Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect(),
            _ => Vec::new(),
        };
        let (x, column) = (inputs.str("x")?, inputs.str("column")?);
        let mut series = Vec::new();
        for i in 1..=CURVES {
            let port = format!("curve{i}");
            let Some(Value::Path(path)) = inputs.get(&port) else {
                continue;
            };
            let path = ctx.input_path(path)?;
            let points = read_curve(&path, x, column).map_err(|e| NodeError::input(&port, e))?;
            let label = labels.get(series.len()).cloned().unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            series.push(Series { label, points });
        }
        let chart = Chart {
            title: inputs.str("title")?.to_string(),
            x_label: inputs.str("x_label")?.to_string(),
            y_label: inputs.str("y_label")?.to_string(),
            y_range: (0.0, 1.0),
            target: match inputs.get("goal") {
                Some(Value::Float(g)) => Some((*g, format!("goal {g}"))),
                _ => None,
            },
            series,
        };
        let img = chart.render();
        let png = encode_png(
            img.as_raw(),
            img.width() as usize,
            img.height() as usize,
            3,
            &[],
        )
        .map_err(NodeError::msg)?;
        let out = ctx.output_path(inputs.path("out")?)?;
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| NodeError::io(parent, e))?;
        }
        atomic_write(ctx, &out, &png)?;
        Ok(Outputs::one("path", Value::Path(out)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(PlotCurves::new())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_column_against_steps_and_names_bad_cells() {
        let dir = std::env::temp_dir().join(format!("pixart-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.csv");
        std::fs::write(&f, "step,colour,all\n0,0.1,0.0\n500,0.5,0.25\n").unwrap();
        assert_eq!(
            read_curve(&f, "step", "all").unwrap(),
            vec![(0.0, 0.0), (500.0, 0.25)]
        );
        let missing = read_curve(&f, "step", "shape").unwrap_err();
        assert!(missing.contains("no column `shape`"), "{missing}");
        std::fs::write(&f, "step,all\n0,x\n").unwrap();
        assert!(read_curve(&f, "step", "all")
            .unwrap_err()
            .contains("c.csv:2"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
