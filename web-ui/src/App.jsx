import { useCallback, useEffect, useMemo, useRef, useState } from 'react';
import {
  Background,
  Controls,
  MiniMap,
  ReactFlow,
  addEdge,
  useEdgesState,
  useNodesState,
  useReactFlow,
} from '@xyflow/react';
import * as api from './api.js';
import NodeCard from './NodeCard.jsx';
import Palette from './Palette.jsx';
import { EditorContext } from './context.js';
import { accepts, typeName } from './types.js';
import { freshId, fromYaml, toYaml } from './workflow.js';

const nodeTypes = { pixart: NodeCard };
const EMPTY_DOC = { version: 1, nodes: {} };

const edgeId = (e) => `${e.source}.${e.sourceHandle}->${e.target}.${e.targetHandle}`;

const toFlowNode = (n) => ({
  id: n.id,
  type: 'pixart',
  position: n.position,
  data: { nodeType: n.type, title: n.title, values: n.values },
});

export default function App() {
  const [specs, setSpecs] = useState([]);
  const [nodes, setNodes, onNodesChange] = useNodesState([]);
  const [edges, setEdges, onEdgesChange] = useEdgesState([]);
  const [doc, setDoc] = useState(EMPTY_DOC);
  const [fileName, setFileName] = useState('workflow.yaml');
  const [findings, setFindings] = useState([]);
  const [valid, setValid] = useState(null);
  const [message, setMessage] = useState(null);
  const [run, setRun] = useState(null); // {id, status}
  const [runNodes, setRunNodes] = useState({});
  const [outputs, setOutputs] = useState({});
  const [online, setOnline] = useState(false);
  const flow = useReactFlow();
  const fileInput = useRef(null);
  const runRef = useRef(null);

  useEffect(() => {
    api.catalog().then(setSpecs).catch((e) => setMessage({ kind: 'error', text: `cannot read the catalog: ${e}` }));
  }, []);

  const specMap = useMemo(() => {
    const m = new Map();
    for (const s of specs) {
      m.set(`${s.name}@${s.version}`, s);
      const newest = m.get(s.name);
      if (!newest || newest.version < s.version) m.set(s.name, s);
    }
    return m;
  }, [specs]);
  const specFor = useCallback((type) => specMap.get(type), [specMap]);

  const say = (kind, text) => setMessage({ kind, text, at: Date.now() });

  // ---- editing -----------------------------------------------------------------

  const setValue = useCallback(
    (nodeId, port, value) =>
      setNodes((ns) =>
        ns.map((n) => {
          if (n.id !== nodeId) return n;
          const values = { ...n.data.values };
          if (value === undefined) delete values[port];
          else values[port] = value;
          return { ...n, data: { ...n.data, values } };
        }),
      ),
    [setNodes],
  );

  const addNode = useCallback(
    (type, position) => {
      setNodes((ns) => {
        const id = freshId(type, new Set(ns.map((n) => n.id)));
        const at = position ?? flow.screenToFlowPosition({ x: window.innerWidth / 2, y: window.innerHeight / 2 });
        return [...ns, toFlowNode({ id, type, values: {}, position: at })];
      });
    },
    [flow, setNodes],
  );

  /** Why `c` may not be made, or null when it may. */
  const refusal = useCallback(
    (c) => {
      const source = nodes.find((n) => n.id === c.source);
      const target = nodes.find((n) => n.id === c.target);
      if (!source || !target) return 'unknown node';
      if (c.source === c.target) return 'a node cannot feed itself';
      const out = specFor(source.data.nodeType)?.outputs.find((o) => o.name === c.sourceHandle);
      const input = specFor(target.data.nodeType)?.inputs.find((i) => i.name === c.targetHandle);
      if (!out || !input) return 'unknown port';
      if (!accepts(input.type, out.type)) {
        return `${c.target}.${c.targetHandle} takes ${typeName(input.type)}, ${c.source}.${c.sourceHandle} gives ${typeName(out.type)}`;
      }
      return null;
    },
    [nodes, specFor],
  );

  const isValidConnection = useCallback((c) => refusal(c) === null, [refusal]);

  const onConnect = useCallback(
    (c) =>
      setEdges((es) => {
        // One edge per input: a new connection replaces the old one.
        const rest = es.filter((e) => !(e.target === c.target && e.targetHandle === c.targetHandle));
        return addEdge({ ...c, id: edgeId(c) }, rest);
      }),
    [setEdges],
  );

  const onConnectEnd = useCallback(
    (_event, state) => {
      if (!state?.toHandle || state.isValid) return;
      const from = state.fromHandle;
      const to = state.toHandle;
      const c =
        from.type === 'source'
          ? { source: from.nodeId, sourceHandle: from.id, target: to.nodeId, targetHandle: to.id }
          : { source: to.nodeId, sourceHandle: to.id, target: from.nodeId, targetHandle: from.id };
      const why = refusal(c) ?? 'ports of the same direction';
      say('error', `Refused: ${why}`);
    },
    [refusal],
  );

  const onDrop = useCallback(
    (e) => {
      e.preventDefault();
      const type = e.dataTransfer.getData('application/x-pixart-node');
      if (type) {
        addNode(type, flow.screenToFlowPosition({ x: e.clientX, y: e.clientY }));
        return;
      }
      const file = e.dataTransfer.files?.[0];
      if (file) file.text().then((text) => load(text, file.name));
    },
    // eslint-disable-next-line react-hooks/exhaustive-deps
    [addNode, flow],
  );

  // ---- load and save -----------------------------------------------------------

  const load = (text, name) => {
    try {
      const parsed = fromYaml(text, (type) => {
        const spec = specFor(type);
        return spec ? 90 + 56 * spec.inputs.length + 30 * spec.outputs.length : 200;
      });
      setDoc(parsed.doc);
      setNodes(parsed.nodes.map(toFlowNode));
      setEdges(parsed.edges.map((e) => ({ ...e, id: edgeId(e) })));
      setFileName(name || 'workflow.yaml');
      setRunNodes({});
      setOutputs({});
      const vp = parsed.doc.ui?.viewport;
      // Fit once React Flow has measured the new nodes.
      setTimeout(() => (vp && Number.isFinite(vp.zoom) ? flow.setViewport(vp) : flow.fitView({ padding: 0.1 })), 100);
      say('info', `Loaded ${name || 'the workflow'}: ${parsed.nodes.length} nodes`);
    } catch (err) {
      say('error', `Cannot load ${name}: ${err.message}`);
    }
  };

  const currentYaml = useCallback(
    () =>
      toYaml(
        doc,
        nodes.map((n) => ({ id: n.id, type: n.data.nodeType, title: n.data.title, values: n.data.values, position: n.position })),
        edges,
        flow.getViewport(),
      ),
    [doc, nodes, edges, flow],
  );

  const save = () => {
    const blob = new Blob([currentYaml()], { type: 'application/yaml' });
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = fileName;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  };

  // ---- validate as you edit ----------------------------------------------------

  // Positions do not change what runs: validate on types, values and edges only.
  const semanticKey = useMemo(
    () => JSON.stringify([nodes.map((n) => [n.id, n.data.nodeType, n.data.values]), edges.map(edgeId), doc.params]),
    [nodes, edges, doc],
  );
  useEffect(() => {
    if (!specs.length) return undefined;
    const timer = setTimeout(async () => {
      if (nodes.length === 0) {
        setFindings([]);
        setValid(null);
        return;
      }
      try {
        const result = await api.validate(currentYaml());
        setFindings(result.diagnostics || []);
        setValid(result.ok);
      } catch (e) {
        setValid(null);
        say('error', `validation failed: ${e}`);
      }
    }, 300);
    return () => clearTimeout(timer);
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [semanticKey, specs]);

  // ---- run ---------------------------------------------------------------------

  // Events of a run can arrive before the server's answer to the submit does:
  // keep recent ones per run and replay them once the run id is known.
  const buffered = useRef(new Map());
  const apply = useRef(null);
  useEffect(
    () =>
      api.events(
        (ev) => {
          if (!ev.run_id) return;
          const list = buffered.current.get(ev.run_id) || [];
          if (list.length < 2000) list.push(ev);
          buffered.current.set(ev.run_id, list);
          if (buffered.current.size > 20) buffered.current.delete(buffered.current.keys().next().value);
          if (ev.run_id === runRef.current) apply.current?.(ev);
        },
        setOnline,
      ),
    [],
  );

  apply.current = (ev) => {
    const node = (state, extra = {}) =>
      setRunNodes((r) => ({ ...r, [ev.node]: { ...(r[ev.node] || {}), state, ...extra } }));
    switch (ev.event) {
      case 'run_started':
        setRun((r) => ({ ...r, status: 'running' }));
        break;
      case 'node_started':
        node('running', { value: 0, max: 0 });
        break;
      case 'node_progress':
        node('running', { value: ev.value, max: ev.max, detail: ev.detail });
        break;
      case 'node_preview':
        setRunNodes((r) => ({ ...r, [ev.node]: { ...(r[ev.node] || {}), preview: ev.image, previewStep: ev.step } }));
        break;
      case 'node_cached':
        node('cached');
        break;
      case 'node_finished':
        node('done', { millis: ev.millis });
        break;
      case 'node_failed':
        node('failed', { error: ev.error });
        break;
      case 'node_skipped':
        node('skipped', { error: ev.because });
        break;
      case 'run_finished':
      case 'run_cancelled':
        finish(ev.run_id, ev.event === 'run_cancelled' ? 'cancelled' : ev.ok ? 'done' : 'failed');
        break;
      default:
    }
  };

  const finish = async (runId, status) => {
    setRun((r) => ({ ...r, status }));
    const record = await api.run(runId);
    const byNode = {};
    for (const o of record?.outputs || []) {
      const images = (o.files || []).filter((f) => /\.(png|jpe?g)$/i.test(f.path || ''));
      if (images.length) byNode[o.node] = [...(byNode[o.node] || []), ...images];
    }
    setOutputs(byNode);
    if (status === 'cancelled') {
      setRunNodes((r) =>
        Object.fromEntries(Object.entries(r).map(([k, v]) => [k, v.state === 'running' || v.state === 'pending' ? { ...v, state: 'cancelled' } : v])),
      );
    }
  };

  const start = async () => {
    const yaml = currentYaml();
    setOutputs({});
    const res = await api.submit(yaml);
    if (!res.run_id) {
      if (res.diagnostics) setFindings(res.diagnostics);
      say('error', res.error || 'the workflow is invalid');
      return;
    }
    runRef.current = res.run_id;
    setRun({ id: res.run_id, status: 'queued' });
    setRunNodes(Object.fromEntries(nodes.map((n) => [n.id, { state: 'pending' }])));
    for (const ev of buffered.current.get(res.run_id) || []) apply.current(ev);
  };

  const stop = async () => {
    if (run?.id) await api.cancel(run.id);
  };

  const running = run && (run.status === 'queued' || run.status === 'running');
  const connected = useMemo(() => new Set(edges.map((e) => `${e.target}\u0000${e.targetHandle}`)), [edges]);
  const context = { specFor, findings, runNodes, connected, outputs, setValue };
  const errors = findings.filter((d) => d.severity === 'error');

  return (
    <EditorContext.Provider value={context}>
      <div className="app">
        <header className="toolbar">
          <span className="brand">pixart-flow</span>
          <button type="button" onClick={() => fileInput.current?.click()}>Load…</button>
          <input
            ref={fileInput}
            type="file"
            accept=".yaml,.yml,application/yaml"
            hidden
            data-testid="load-file"
            onChange={(e) => {
              const f = e.target.files?.[0];
              if (f) f.text().then((t) => load(t, f.name));
              e.target.value = '';
            }}
          />
          <button type="button" onClick={save} disabled={!nodes.length}>Save YAML</button>
          <span className={`validity ${valid === true ? 'ok' : valid === false ? 'bad' : ''}`} data-testid="validity">
            {valid === true ? 'valid' : valid === false ? `${errors.length} error${errors.length === 1 ? '' : 's'}` : '—'}
          </span>
          <button type="button" className="primary" onClick={start} disabled={!nodes.length || running}>Run</button>
          <button type="button" onClick={stop} disabled={!running}>Cancel</button>
          <span className="run-status" data-testid="run-status">{run ? `run ${run.id}: ${run.status}` : ''}</span>
          <span className={`online ${online ? 'on' : ''}`} title="event stream">{online ? '● live' : '○ offline'}</span>
        </header>
        <Palette specs={specs} onAdd={(t) => addNode(t)} />
        <main className="canvas" onDragOver={(e) => e.preventDefault()} onDrop={onDrop}>
          <ReactFlow
            nodes={nodes}
            edges={edges}
            nodeTypes={nodeTypes}
            onNodesChange={onNodesChange}
            onEdgesChange={onEdgesChange}
            onConnect={onConnect}
            onConnectEnd={onConnectEnd}
            isValidConnection={isValidConnection}
            deleteKeyCode={['Backspace', 'Delete']}
            minZoom={0.1}
            defaultViewport={{ x: 0, y: 0, zoom: 0.8 }}
          >
            <Background />
            <Controls />
            <MiniMap pannable zoomable />
          </ReactFlow>
          {message && (
            <div className={`toast ${message.kind}`} role="status" data-testid="toast" onClick={() => setMessage(null)}>
              {message.text}
            </div>
          )}
        </main>
        <aside className="side">
          <h3>Findings</h3>
          {findings.length === 0 && <p className="muted">{valid ? 'No problems.' : 'Nothing to report.'}</p>}
          <ul className="findings">
            {findings.map((d, i) => (
              <li key={i} className={d.severity}>
                {d.line ? `line ${d.line}: ` : ''}
                {d.node ? `${d.node}${d.port ? `.${d.port}` : ''}: ` : ''}
                {d.message}
              </li>
            ))}
          </ul>
          <h3>Outputs</h3>
          {Object.keys(outputs).length === 0 && <p className="muted">Images a run writes appear here.</p>}
          {Object.entries(outputs).map(([node, files]) =>
            files.map((f) => (
              <figure key={f.id}>
                <img className="side-image" src={api.fileUrl(f.id)} alt={`${node} output`} />
                <figcaption>{node}</figcaption>
              </figure>
            )),
          )}
        </aside>
      </div>
    </EditorContext.Provider>
  );
}
