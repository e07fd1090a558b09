//! Drawing a workflow's graph: Graphviz DOT and Mermaid.

use crate::workflow::Workflow;
use petgraph::visit::EdgeRef;

/// `digraph` with one box per node (`id` and `type`) and labelled data edges.
pub fn to_dot(wf: &Workflow) -> String {
    let mut out = String::from(
        "digraph workflow {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    for n in &wf.nodes {
        let style = if n.node.spec().output_node {
            ", style=bold"
        } else {
            ""
        };
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n{}\"{style}];\n",
            n.id,
            escape(&n.id),
            escape(&n.type_id)
        ));
    }
    for e in wf.graph.edge_references() {
        let (from, to) = (&wf.nodes[e.source().index()], &wf.nodes[e.target().index()]);
        let w = e.weight();
        out.push_str(&format!(
            "  \"{}\" -> \"{}\" [label=\"{} → {}\"];\n",
            from.id,
            to.id,
            from.node.spec().outputs[w.output].name,
            to.node.spec().inputs[w.input].name
        ));
    }
    out.push_str("}\n");
    out
}

/// A Mermaid `flowchart LR`.
pub fn to_mermaid(wf: &Workflow) -> String {
    let mut out = String::from("flowchart LR\n");
    for n in &wf.nodes {
        out.push_str(&format!(
            "  {}[\"{}<br/>{}\"]\n",
            n.id,
            escape(&n.id),
            escape(&n.type_id)
        ));
    }
    for e in wf.graph.edge_references() {
        let (from, to) = (&wf.nodes[e.source().index()], &wf.nodes[e.target().index()]);
        let w = e.weight();
        out.push_str(&format!(
            "  {} -- \"{} → {}\" --> {}\n",
            from.id,
            from.node.spec().outputs[w.output].name,
            to.node.spec().inputs[w.input].name,
            to.id
        ));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
