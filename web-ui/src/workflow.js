// Workflow YAML <-> editor graph. What the editor saves is a workflow `pixart run`
// runs: node ids, params, every other top-level key and the `ui:` block are kept;
// node positions live in `ui.nodes`.

import YAML from 'yaml';

const REF = /^\$\{([A-Za-z_][A-Za-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_-]*)\}$/;

/** `"${node.output}"` → {node, output}; anything else → null. */
export function parseRef(value) {
  if (typeof value !== 'string') return null;
  const m = REF.exec(value.trim());
  if (!m || m[1] === 'params') return null;
  return { node: m[1], output: m[2] };
}

/**
 * Parses workflow text. Returns {doc, nodes, edges} where nodes are
 * {id, type, title, values, position} and edges {source, sourceHandle, target,
 * targetHandle}; `doc` keeps everything else for saving.
 */
export function fromYaml(text, heightOf = () => 200) {
  const doc = YAML.parse(text) ?? {};
  if (typeof doc !== 'object' || Array.isArray(doc)) {
    throw new Error('a workflow is a YAML mapping with `version: 1` and `nodes:`');
  }
  const layout = (doc.ui && typeof doc.ui === 'object' && doc.ui.nodes) || {};
  const nodes = [];
  const edges = [];
  const entries = Object.entries(doc.nodes || {});
  entries.forEach(([id, node]) => {
    const values = {};
    for (const [port, value] of Object.entries(node?.inputs || {})) {
      const ref = parseRef(value);
      if (ref) {
        edges.push({ source: ref.node, sourceHandle: ref.output, target: id, targetHandle: port });
      } else {
        values[port] = value;
      }
    }
    const pos = layout[id];
    nodes.push({
      id,
      type: node?.type ?? '',
      title: node?.title,
      values,
      position: pos && Number.isFinite(pos.x) && Number.isFinite(pos.y) ? { x: pos.x, y: pos.y } : null,
    });
  });
  placeUnplaced(nodes, edges, heightOf);
  return { doc, nodes, edges };
}

/** The workflow text for the editor's graph, on top of the loaded document. */
export function toYaml(doc, nodes, edges, viewport) {
  const out = { ...doc };
  if (out.version === undefined) out.version = 1;
  const byTarget = new Map();
  for (const e of edges) byTarget.set(`${e.target}\u0000${e.targetHandle}`, e);
  const oldNodes = doc.nodes || {};
  const yamlNodes = {};
  for (const n of nodes) {
    const old = oldNodes[n.id] && typeof oldNodes[n.id] === 'object' ? oldNodes[n.id] : {};
    const inputs = {};
    // The file's own order of inputs first, then new ones.
    const ports = new Set([
      ...Object.keys(old.inputs || {}),
      ...Object.keys(n.values),
      ...edges.filter((e) => e.target === n.id).map((e) => e.targetHandle),
    ]);
    for (const port of ports) {
      const edge = byTarget.get(`${n.id}\u0000${port}`);
      if (edge) inputs[port] = `\${${edge.source}.${edge.sourceHandle}}`;
      else if (n.values[port] !== undefined) inputs[port] = n.values[port];
    }
    const entry = { ...old, type: n.type };
    if (n.title) entry.title = n.title;
    if (Object.keys(inputs).length) entry.inputs = inputs;
    else delete entry.inputs;
    yamlNodes[n.id] = entry;
  }
  out.nodes = yamlNodes;
  const ui = out.ui && typeof out.ui === 'object' ? { ...out.ui } : {};
  ui.nodes = Object.fromEntries(nodes.map((n) => [n.id, { x: Math.round(n.position.x), y: Math.round(n.position.y) }]));
  if (viewport) ui.viewport = { x: Math.round(viewport.x), y: Math.round(viewport.y), zoom: Number(viewport.zoom.toFixed(3)) };
  out.ui = ui;
  // Keep the usual order: version, name, description, params, plugins, nodes, ui.
  const order = ['version', 'name', 'description', 'params', 'plugins', 'nodes', 'ui'];
  const sorted = {};
  for (const k of order) if (k in out) sorted[k] = out[k];
  for (const k of Object.keys(out)) if (!(k in sorted)) sorted[k] = out[k];
  return YAML.stringify(sorted, { lineWidth: 0 });
}

/** A fresh node id from a type: `noise.gaussian` → `gaussian`, `gaussian_2`, … */
export function freshId(type, taken) {
  const base = (type.split('/').pop().split('.').pop() || 'node').replace(/[^A-Za-z0-9_-]/g, '_');
  const start = /^[A-Za-z_]/.test(base) ? base : `n_${base}`;
  if (!taken.has(start)) return start;
  for (let i = 2; ; i++) if (!taken.has(`${start}_${i}`)) return `${start}_${i}`;
}

/** Lays out nodes that have no saved position: a column per depth in the graph
 * (longest path from a source), stacked by file order. */
function placeUnplaced(nodes, edges, heightOf) {
  if (nodes.every((n) => n.position)) return;
  const depth = new Map(nodes.map((n) => [n.id, 0]));
  for (let pass = 0; pass < nodes.length; pass++) {
    let changed = false;
    for (const e of edges) {
      const d = (depth.get(e.source) ?? 0) + 1;
      if (depth.has(e.target) && d > depth.get(e.target) && d < nodes.length) {
        depth.set(e.target, d);
        changed = true;
      }
    }
    if (!changed) break;
  }
  const columnY = new Map();
  for (const n of nodes) {
    if (n.position) continue;
    const d = depth.get(n.id);
    const y = columnY.get(d) ?? 40;
    n.position = { x: 40 + d * 340, y };
    columnY.set(d, y + heightOf(n.type) + 40);
  }
}
