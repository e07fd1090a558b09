// Workflow YAML <-> editor graph. What the editor saves is a workflow `pixart run`
// runs: node ids, params, every other top-level key, comments and the `ui:`
// block are kept; node positions live in `ui.nodes`.

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
  let doc;
  try {
    doc = YAML.parse(text) ?? {};
  } catch (e) {
    throw new Error(`it is not valid YAML (${e.message.split('\n')[0]})`);
  }
  if (typeof doc !== 'object' || Array.isArray(doc) || (doc.nodes !== undefined && (typeof doc.nodes !== 'object' || Array.isArray(doc.nodes)))) {
    throw new Error('a workflow is a YAML mapping with `version: 1` and a `nodes:` mapping');
  }
  if (doc.nodes === undefined && Object.keys(doc).length > 0 && doc.version === undefined) {
    throw new Error('it has neither `version:` nor `nodes:`, so it is not a workflow');
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

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const isMap = (node) => YAML.isMap(node);

/** Each node's inputs as the workflow writes them: edges as `${node.output}`,
 * the file's own order of inputs first, then new ones. */
function inputsOf(n, edges, oldInputs) {
  const byTarget = new Map();
  for (const e of edges) if (e.target === n.id) byTarget.set(e.targetHandle, e);
  const ports = new Set([...oldInputs, ...Object.keys(n.values), ...byTarget.keys()]);
  const inputs = {};
  for (const port of ports) {
    const edge = byTarget.get(port);
    if (edge) inputs[port] = `\${${edge.source}.${edge.sourceHandle}}`;
    else if (n.values[port] !== undefined) inputs[port] = n.values[port];
  }
  return inputs;
}

/**
 * The workflow text for the editor's graph, written onto the text it was loaded
 * from (`source`, '' for a new one): what the graph did not change keeps its
 * comments, order and style; only changed values, added or removed nodes and
 * inputs, and the `ui:` block (positions, viewport) are rewritten.
 */
export function toYaml(source, nodes, edges, viewport) {
  let doc = source ? YAML.parseDocument(source) : null;
  if (!doc || doc.errors.length || !isMap(doc.contents)) doc = new YAML.Document({ version: 1 });
  if (!doc.has('version')) doc.contents.items.unshift(doc.createPair('version', 1));
  let yamlNodes = doc.get('nodes', true);
  if (!isMap(yamlNodes)) {
    doc.set('nodes', doc.createNode({}));
    yamlNodes = doc.get('nodes', true);
  }
  const ids = new Set(nodes.map((n) => n.id));
  for (const pair of [...yamlNodes.items]) {
    const key = YAML.isScalar(pair.key) ? pair.key.value : pair.key;
    if (!ids.has(String(key))) yamlNodes.delete(pair.key);
  }
  for (const n of nodes) {
    let entry = yamlNodes.get(n.id, true);
    if (!isMap(entry)) {
      entry = doc.createNode({ type: n.type });
      yamlNodes.set(n.id, entry);
    }
    if (entry.get('type') !== n.type) entry.set('type', n.type);
    if (n.title && entry.get('title') !== n.title) entry.set('title', n.title);
    if (!n.title && entry.has('title')) entry.delete('title');
    const old = entry.get('inputs', true);
    const oldKeys = isMap(old) ? old.items.map((p) => String(YAML.isScalar(p.key) ? p.key.value : p.key)) : [];
    const inputs = inputsOf(n, edges, oldKeys);
    if (Object.keys(inputs).length === 0) {
      entry.delete('inputs');
    } else if (!isMap(old)) {
      const created = doc.createNode(inputs);
      created.flow = true;
      entry.set('inputs', created);
    } else {
      for (const key of oldKeys) if (!(key in inputs)) old.delete(key);
      for (const [port, value] of Object.entries(inputs)) {
        const current = old.get(port, true);
        const was = current === undefined ? undefined : YAML.isNode(current) ? current.toJSON() : current;
        if (!same(was, value)) old.set(port, doc.createNode(value));
      }
    }
  }
  const layout = Object.fromEntries(nodes.map((n) => [n.id, { x: Math.round(n.position.x), y: Math.round(n.position.y) }]));
  if (!isMap(doc.get('ui', true))) doc.set('ui', doc.createNode({}));
  // One line a node: `pipe: {x: 40, y: 40}`.
  const positions = doc.createNode(layout);
  for (const pair of positions.items) pair.value.flow = true;
  doc.setIn(['ui', 'nodes'], positions);
  if (viewport) {
    const view = doc.createNode({ x: Math.round(viewport.x), y: Math.round(viewport.y), zoom: Number(viewport.zoom.toFixed(3)) });
    view.flow = true;
    doc.setIn(['ui', 'viewport'], view);
  }
  return doc.toString({ lineWidth: 0, flowCollectionPadding: false });
}

/** The workflow's declared params: [{name, type, default, min, max, choices,
 * description}] in the file's order (a scalar shorthand `seed: 3` included). */
export function paramDecls(doc) {
  const params = doc?.params;
  if (!params || typeof params !== 'object' || Array.isArray(params)) return [];
  return Object.entries(params).map(([name, decl]) => {
    if (decl === null || typeof decl !== 'object' || Array.isArray(decl)) {
      const type = typeof decl === 'boolean' ? 'bool' : Number.isInteger(decl) ? 'int' : typeof decl === 'number' ? 'float' : 'string';
      return { name, type, default: decl, description: '' };
    }
    const type = decl.type ?? (Array.isArray(decl.choices) ? 'enum' : 'string');
    return {
      name,
      type,
      default: decl.default,
      min: decl.min,
      max: decl.max,
      choices: Array.isArray(decl.choices) ? decl.choices.map(String) : undefined,
      description: decl.description || '',
    };
  });
}

/** Line (1-based) of the key at `path` in a parsed document, or null. */
function lineOf(doc, counter, path) {
  let node = doc.contents;
  let line = null;
  for (const key of path) {
    if (!isMap(node)) return null;
    const pair = node.items.find((p) => String(YAML.isScalar(p.key) ? p.key.value : p.key) === key);
    if (!pair) return null;
    line = pair.key?.range ? counter.linePos(pair.key.range[0]).line : line;
    node = pair.value;
  }
  return line;
}

/** The path of the deepest key written on `line` (1-based) of a document. */
function pathAt(doc, counter, line) {
  let best = null;
  const walk = (node, path) => {
    if (!isMap(node)) return;
    for (const pair of node.items) {
      const key = String(YAML.isScalar(pair.key) ? pair.key.value : pair.key);
      const start = pair.key?.range ? counter.linePos(pair.key.range[0]).line : null;
      const end = pair.value?.range ? counter.linePos(pair.value.range[1]).line : start;
      if (start === null || line < start || line > end) continue;
      best = [...path, key];
      walk(pair.value, best);
    }
  };
  walk(doc.contents, []);
  return best;
}

const parsed = (text) => {
  const counter = new YAML.LineCounter();
  const doc = YAML.parseDocument(text, { lineCounter: counter });
  return { doc, counter };
};

/**
 * Maps the server's findings on `sent` (the text validated) back to lines of
 * `original` (the file the user loaded), by what they point at: node and port,
 * a param, or the key on the reported line. A finding about something the file
 * does not have yet gets `line: null` and `added: true`.
 */
export function mapFindings(findings, sent, original) {
  if (!original || original === sent) return findings;
  let s;
  let o;
  try {
    s = parsed(sent);
    o = parsed(original);
  } catch {
    return findings;
  }
  return findings.map((d) => {
    let path = null;
    if (d.node) path = ['nodes', d.node, ...(d.port ? ['inputs', d.port] : [])];
    else if (d.port) path = ['params', d.port];
    else if (d.line) path = pathAt(s.doc, s.counter, d.line);
    if (!path) return d;
    let line = lineOf(o.doc, o.counter, path);
    // A node's input the file does not write yet: point at the node.
    if (line === null && d.node) line = lineOf(o.doc, o.counter, ['nodes', d.node]);
    return line === null ? { ...d, line: null, added: true } : { ...d, line };
  });
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
