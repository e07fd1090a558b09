//! Every kind of validation finding, with its line, node and port; and all of
//! them reported together.

mod common;

use common::{line_of, registry};
use pixart_runtime::workflow::{
    load_workflow, Diagnostic, DiagnosticKind as K, LoadOptions, Severity,
};
use pixart_runtime::Registry;

fn findings(yaml: &str, reg: &Registry, overrides: &[(&str, &str)]) -> Vec<Diagnostic> {
    let opts = LoadOptions {
        file_name: Some("wf.yaml".into()),
        overrides: overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..LoadOptions::default()
    };
    match load_workflow(yaml, reg, &opts) {
        Ok(wf) => wf.warnings,
        Err(e) => e.diagnostics,
    }
}

/// The only error of a workflow, which must be of `kind`.
fn only_error(yaml: &str, kind: K) -> Diagnostic {
    let (reg, _) = registry();
    let errors: Vec<_> = findings(yaml, &reg, &[])
        .into_iter()
        .filter(|d| d.is_error())
        .collect();
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let e = errors.into_iter().next().unwrap();
    assert_eq!(e.kind, kind, "{e}");
    assert_eq!(e.file.as_deref(), Some("wf.yaml"));
    e
}

const NOISE: &str = "version: 1
params:
  seed: {type: int, default: 0, min: 0}
nodes:
  noise:
    type: noise.gaussian
    inputs: {shape: [1, 4, 8, 8], seed: \"${params.seed}\"}
  save:
    type: tensor.save
    inputs: {tensor: \"${noise.tensor}\", path: \"out/noise-${params.seed}.safetensors\"}
";

#[test]
fn the_issue_example_is_valid() {
    let (reg, _) = registry();
    assert!(findings(NOISE, &reg, &[]).is_empty());
}

#[test]
fn yaml_syntax_error_has_its_line() {
    let yaml = "version: 1\nnodes:\n  a:\n    type: literal.int\n    inputs: {value: [1, 2}\n";
    let e = only_error(yaml, K::Syntax);
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.to_string().starts_with("wf.yaml:5:"), "{e}");
}

#[test]
fn unknown_node_type_suggests_the_closest_name() {
    let yaml = NOISE.replace("type: noise.gaussian", "type: noise.gausian");
    let e = only_error(&yaml, K::UnknownNodeType);
    assert_eq!(e.line, Some(line_of(&yaml, "noise.gausian")));
    assert_eq!(e.column, Some(11));
    assert_eq!(e.node.as_deref(), Some("noise"));
    assert!(e.help.as_deref().unwrap().contains("noise.gaussian"), "{e}");
}

#[test]
fn unknown_version_lists_the_available_ones() {
    let yaml = NOISE.replace("type: noise.gaussian", "type: noise.gaussian@7");
    let e = only_error(&yaml, K::UnknownNodeType);
    assert!(
        e.help.as_deref().unwrap().contains("available versions: 1"),
        "{e}"
    );
    let pinned = NOISE.replace("type: noise.gaussian", "type: noise.gaussian@1");
    let (reg, _) = registry();
    assert!(findings(&pinned, &reg, &[]).is_empty());
}

#[test]
fn unknown_port_names_node_and_port() {
    let yaml = NOISE.replace("seed: \"${params.seed}\"}", "sed: \"${params.seed}\"}");
    let (reg, _) = registry();
    let all = findings(&yaml, &reg, &[]);
    let e = all
        .iter()
        .find(|d| d.kind == K::UnknownPort)
        .expect("unknown port reported");
    assert_eq!(e.line, Some(line_of(&yaml, "sed:")));
    assert_eq!(
        (e.node.as_deref(), e.port.as_deref()),
        (Some("noise"), Some("sed"))
    );
    assert!(e.help.as_deref().unwrap().contains("`seed`"), "{e}");
}

#[test]
fn missing_required_input() {
    let yaml = NOISE.replace("shape: [1, 4, 8, 8], ", "");
    let e = only_error(&yaml, K::MissingInput);
    assert_eq!(e.line, Some(line_of(&yaml, "noise:")));
    assert_eq!(e.port.as_deref(), Some("shape"));
    assert!(e.message.contains("List<Int>"), "{e}");
}

#[test]
fn type_mismatch_across_an_edge_names_both_types() {
    let yaml = NOISE.replace(
        "path: \"out/noise-${params.seed}.safetensors\"",
        "path: \"${noise.tensor}\"",
    );
    let yaml = yaml.replace("seed: {type: int, default: 0, min: 0}", "seed: 0");
    let (reg, _) = registry();
    let e = findings(&yaml, &reg, &[])
        .into_iter()
        .find(|d| d.kind == K::TypeMismatch)
        .expect("type mismatch");
    assert_eq!(e.line, Some(line_of(&yaml, "path: \"${noise.tensor}")));
    assert_eq!(
        (e.node.as_deref(), e.port.as_deref()),
        (Some("save"), Some("path"))
    );
    assert!(
        e.message.contains("Tensor") && e.message.contains("Path"),
        "{e}"
    );
}

#[test]
fn int_widens_to_float_but_float_does_not_narrow() {
    let (reg, _) = registry();
    let widen = "version: 1
nodes:
  i: {type: math.int, inputs: {a: 1, b: 2}}
  f: {type: math.float, inputs: {a: \"${i.result}\", b: 0.5}}
";
    assert!(findings(widen, &reg, &[]).is_empty());
    let narrow = "version: 1
nodes:
  f: {type: math.float, inputs: {a: 1.5, b: 0.5}}
  i: {type: math.int, inputs: {a: \"${f.result}\", b: 2}}
";
    let e = only_error(narrow, K::TypeMismatch);
    assert!(
        e.message.contains("Float") && e.message.contains("Int"),
        "{e}"
    );
    assert_eq!(e.line, Some(4));
    // A literal float where an int is expected is refused too.
    let literal = "version: 1\nnodes:\n  i: {type: math.int, inputs: {a: 1.5, b: 2}}\n";
    let e = only_error(literal, K::TypeMismatch);
    assert_eq!(e.port.as_deref(), Some("a"));
}

#[test]
fn literal_out_of_range() {
    let yaml = NOISE
        .replace("seed: \"${params.seed}\"}", "seed: -1}")
        .replace("params:\n  seed: {type: int, default: 0, min: 0}\n", "");
    let yaml = yaml.replace("-${params.seed}", "");
    let e = only_error(&yaml, K::OutOfRange);
    assert_eq!(e.line, Some(line_of(&yaml, "seed: -1")));
    assert!(e.message.contains("minimum 0"), "{e}");
    // Each list item is checked against the bounds.
    let zero_dim = NOISE.replace("[1, 4, 8, 8]", "[1, 0, 8, 8]");
    let e = only_error(&zero_dim, K::OutOfRange);
    assert_eq!(e.port.as_deref(), Some("shape"));
}

#[test]
fn literal_not_in_choices() {
    let yaml = NOISE.replace(
        "seed: \"${params.seed}\"}",
        "seed: \"${params.seed}\", dtype: f64}",
    );
    let e = only_error(&yaml, K::NotInChoices);
    assert!(e.message.contains("f32, f16, bf16"), "{e}");
    assert_eq!(e.port.as_deref(), Some("dtype"));
}

#[test]
fn reference_to_missing_node_or_output() {
    let yaml = NOISE.replace("${noise.tensor}", "${nois.tensor}");
    let e = only_error(&yaml, K::MissingReference);
    assert!(
        e.help.as_deref().unwrap().contains("${noise.tensor}"),
        "{e}"
    );
    assert_eq!(e.line, Some(line_of(&yaml, "nois.tensor")));
    let yaml = NOISE.replace("${noise.tensor}", "${noise.tensr}");
    let e = only_error(&yaml, K::MissingReference);
    assert!(e.message.contains("no output `tensr`"), "{e}");
    let yaml = NOISE.replace("seed: \"${params.seed}\"", "seed: \"${params.sed}\"");
    let (reg, _) = registry();
    let all = findings(&yaml, &reg, &[]);
    let e = all
        .iter()
        .find(|d| d.kind == K::MissingReference)
        .expect("missing param reported");
    assert_eq!(
        (e.node.as_deref(), e.port.as_deref()),
        (Some("noise"), Some("seed"))
    );
    assert!(e.help.as_deref().unwrap().contains("params.seed"), "{e}");
}

#[test]
fn cycles_list_their_nodes() {
    let yaml = "version: 1
nodes:
  a: {type: test.add, inputs: {a: \"${c.out}\"}}
  b: {type: test.add, inputs: {a: \"${a.out}\"}}
  c: {type: test.add, inputs: {a: \"${b.out}\"}}
  d: {type: test.add, inputs: {a: \"${d.out}\"}}
  e: {type: test.output, inputs: {a: \"${c.out}\"}}
";
    let (reg, _) = registry();
    let cycles: Vec<_> = findings(yaml, &reg, &[])
        .into_iter()
        .filter(|d| d.kind == K::Cycle)
        .collect();
    assert_eq!(cycles.len(), 2, "{cycles:#?}");
    assert!(cycles[0].message.contains("a → b → c → a"), "{}", cycles[0]);
    assert_eq!(cycles[0].line, Some(3));
    assert!(cycles[1].message.contains("d → d"), "{}", cycles[1]);
    assert_eq!(cycles[1].line, Some(6));
}

#[test]
fn unused_param_is_a_warning() {
    let yaml = NOISE.replace("params:\n", "params:\n  steps: {type: int, default: 20}\n");
    let (reg, _) = registry();
    let opts = LoadOptions::default();
    let wf = load_workflow(&yaml, &reg, &opts).expect("warnings do not stop loading");
    assert_eq!(wf.warnings.len(), 1);
    let w = &wf.warnings[0];
    assert_eq!((w.kind, w.severity), (K::UnusedParam, Severity::Warning));
    assert_eq!(w.line, Some(3));
}

#[test]
fn all_errors_are_reported_together_in_file_order() {
    let yaml = "version: 1
nodes:
  noise:
    type: noise.gaussian
    inputs: {shape: [1, 4, 8, 8], seed: -3, dtype: f64}
  bad:
    type: no.such.node
  save:
    type: tensor.save
    inputs: {tensor: \"${noise.missing}\", pth: out/x.safetensors}
";
    let (reg, _) = registry();
    let all = findings(yaml, &reg, &[]);
    let kinds: Vec<(K, Option<usize>)> = all.iter().map(|d| (d.kind, d.line)).collect();
    assert_eq!(
        kinds,
        vec![
            (K::OutOfRange, Some(5)),
            (K::NotInChoices, Some(5)),
            (K::UnknownNodeType, Some(7)),
            (K::MissingInput, Some(8)),
            (K::MissingReference, Some(10)),
            (K::UnknownPort, Some(10)),
        ],
        "{all:#?}"
    );
}

#[test]
fn params_are_typed_and_overridable() {
    let (reg, _) = registry();
    let wf = common::load_with(NOISE, &reg, &[("seed", "42")]);
    assert_eq!(wf.params[0].value.as_int(), Some(42));

    let bad = findings(NOISE, &reg, &[("seed", "abc")]);
    assert_eq!(bad.len(), 1);
    assert!(bad[0].message.contains("not a valid Int"), "{}", bad[0]);
    let below = findings(NOISE, &reg, &[("seed", "-1")]);
    assert_eq!(below[0].kind, K::OutOfRange);
    assert_eq!(below[0].line, Some(3));
    let unknown = findings(NOISE, &reg, &[("sed", "1")]);
    assert!(unknown[0].help.as_deref().unwrap().contains("`seed`"));

    // A param without a default must be set.
    let required = NOISE.replace("{type: int, default: 0, min: 0}", "{type: int, min: 0}");
    let e = findings(&required, &reg, &[]);
    assert_eq!(e[0].kind, K::MissingInput);
    assert!(
        common::load_with(&required, &reg, &[("seed", "1")]).params[0]
            .value
            .as_int()
            == Some(1)
    );

    // Params feed list items and the type of the input decides.
    let yaml = "version: 1
params: {h: 16, w: {type: int, default: 8}}
nodes:
  noise: {type: noise.gaussian, inputs: {shape: [1, 4, \"${params.h}\", \"${params.w}\"]}}
";
    let wf = common::load(yaml, &reg);
    match &wf.nodes[0].inputs[0] {
        pixart_runtime::workflow::Binding::Literal(v) => {
            assert_eq!(v.to_json().to_string(), "[1,4,16,8]")
        }
        other => panic!("{other:?}"),
    }
    // A float param into an int input is a type mismatch, named as such.
    let yaml = "version: 1\nparams: {x: 1.5}\nnodes:\n  i: {type: math.int, inputs: {a: \"${params.x}\", b: 1}}\n";
    let e = only_error(yaml, K::TypeMismatch);
    assert!(e.message.contains("param `x` is Float"), "{e}");
}

#[test]
fn schema_errors_name_the_key() {
    let yaml = "version: 1\nnodez: {}\n";
    let (reg, _) = registry();
    let all = findings(yaml, &reg, &[]);
    assert!(
        all.iter().any(|d| d.kind == K::Schema
            && d.line == Some(2)
            && d.help.as_deref() == Some("did you mean `nodes`?")),
        "{all:#?}"
    );
    let yaml = "version: 2\nnodes:\n  a: {type: literal.int, inputs: {value: 1}}\n";
    let e = only_error(yaml, K::Schema);
    assert_eq!(e.line, Some(1));
    let yaml = "version: 1\nnodes:\n  a: {type: literal.int, input: {value: 1}}\n";
    let (reg, _) = registry();
    let all = findings(yaml, &reg, &[]);
    assert!(
        all.iter()
            .any(|d| d.kind == K::Schema && d.help.as_deref() == Some("did you mean `inputs`?")),
        "{all:#?}"
    );
    let yaml = "version: 1\nnodes:\n  bad.id: {type: literal.int, inputs: {value: 1}}\n";
    let e = only_error(yaml, K::InvalidValue);
    assert_eq!(e.line, Some(3));
}

#[test]
fn interpolation_of_node_outputs_needs_scalars_and_text_inputs() {
    let (reg, _) = registry();
    let ok = "version: 1
nodes:
  n: {type: math.int, inputs: {a: 2, b: 3}}
  t: {type: text.save, inputs: {text: \"sum=${n.result}\", path: \"out/${n.result}.txt\"}}
";
    common::load(ok, &reg);
    let tensor_in_text = "version: 1
nodes:
  z: {type: noise.gaussian, inputs: {shape: [2]}}
  t: {type: text.save, inputs: {text: \"noise=${z.tensor}\", path: out/x.txt}}
";
    let e = only_error(tensor_in_text, K::TypeMismatch);
    assert!(e.message.contains("only scalars"), "{e}");
    let text_into_int = "version: 1
nodes:
  n: {type: math.int, inputs: {a: 2, b: 3}}
  m: {type: math.int, inputs: {a: \"1${n.result}\", b: 3}}
";
    let e = only_error(text_into_int, K::TypeMismatch);
    assert!(
        e.message.contains("String") && e.message.contains("Int"),
        "{e}"
    );
}
