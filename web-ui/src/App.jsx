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
import QuickAdd from './QuickAdd.jsx';
import ParamsPanel, { isSeed, randomSeed } from './ParamsPanel.jsx';
import QueuePanel from './QueuePanel.jsx';
import GalleryPanel, { imagesOf } from './GalleryPanel.jsx';
import { Toasts, useToasts } from './Toasts.jsx';
import { EditorContext } from './context.js';
import { accepts, typeName } from './types.js';
import { freshId, fromYaml, mapFindings, paramDecls, toYaml } from './workflow.js';
import { isPng, workflowFromPng } from './png.js';
import { useUndo } from './undo.js';

const nodeTypes = { pixart: NodeCard };
const AUTOSAVE_KEY = 'pixart-editor-canvas';
const CLIPBOARD_KEY = 'pixart-editor-clipboard';

const edgeId = (e) => `${e.source}.${e.sourceHandle}->${e.target}.${e.targetHandle}`;

const toFlowNode = (n) => ({
  id: n.id,
  type: 'pixart',
  position: n.position,
  data: { nodeType: n.type, title: n.title, values: n.values },
});

/** A node as the workflow sees it (no selection, measurements or drag state). */
const plainNode = (n) => ({ id: n.id, type: n.data.nodeType, title: n.data.title, values: n.data.values, position: n.position });
const plainEdge = (e) => ({ source: e.source, sourceHandle: e.sourceHandle, target: e.target, targetHandle: e.targetHandle });

const inTextField = (el) => el && (el.tagName === 'INPUT' || el.tagName === 'TEXTAREA' || el.tagName === 'SELECT' || el.isContentEditable);

const defaultsOf = (decls) => Object.fromEntries(decls.filter((d) => d.default !== undefined).map((d) => [d.name, d.default]));

export default function App() {
  const [specs, setSpecs] = useState([]);
  const [nodes, setNodes, onNodesChange] = useNodesState([]);
  const [edges, setEdges, onEdgesChange] = useEdgesState([]);
  // The text the canvas was loaded from: saving writes the graph onto it (its
  // comments kept), and findings are mapped back to its lines.
  const [source, setSource] = useState('');
  const [fileName, setFileName] = useState('workflow.yaml');
  const [paramValues, setParamValues] = useState({});
  const [randomize, setRandomize] = useState(new Set());
  const [findings, setFindings] = useState([]);
  const [valid, setValid] = useState(null);
  const [shown, setShown] = useState(null); // the run the canvas shows: {id, status}
  const [runNodes, setRunNodes] = useState({});
  const [outputs, setOutputs] = useState({});
  const [online, setOnline] = useState(false);
  const [queue, setQueue] = useState({ paused: false, runs: [] });
  const [records, setRecords] = useState([]);
  const [tab, setTab] = useState('params');
  const [quickAdd, setQuickAdd] = useState(null); // {screen, flow} positions
  const { toasts, say, dismiss } = useToasts();
  const flow = useReactFlow();
  const fileInput = useRef(null);
  const shownRef = useRef(null);
  const mine = useRef(new Map()); // run id → the nodes it needs, for runs this page queued
  const restored = useRef(false);

  useEffect(() => {
    api.catalog().then(setSpecs).catch((e) => say('error', `cannot read the node catalog: ${e}`));
  }, [say]);

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

  const doc = useMemo(() => {
    try {
      return fromYaml(source || 'version: 1').doc;
    } catch {
      return {};
    }
  }, [source]);
  const decls = useMemo(() => paramDecls(doc), [doc]);

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

  /** `at`, moved down and right past nodes already there: added nodes never
   * hide one another. */
  const freeSpot = (taken, at) => {
    const spot = { ...at };
    for (let i = 0; i < 50 && taken.some((n) => Math.abs(n.position.x - spot.x) < 40 && Math.abs(n.position.y - spot.y) < 40); i++) {
      spot.x += 40;
      spot.y += 40;
    }
    return spot;
  };

  const addNode = useCallback(
    (type, position) => {
      setNodes((ns) => {
        const id = freshId(type, new Set(ns.map((n) => n.id)));
        const at = position ?? flow.screenToFlowPosition({ x: window.innerWidth / 2 - 150, y: window.innerHeight / 3 });
        return [...ns, toFlowNode({ id, type, values: {}, position: freeSpot(ns, at) })];
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
    [refusal, say],
  );

  // ---- undo, copy and paste -------------------------------------------------------

  const snapshot = useMemo(
    () => JSON.stringify({ nodes: nodes.map(plainNode), edges: edges.map(plainEdge), source, fileName }),
    [nodes, edges, source, fileName],
  );
  const restoreSnapshot = useCallback(
    (text) => {
      const s = JSON.parse(text);
      setNodes(s.nodes.map(toFlowNode));
      setEdges(s.edges.map((e) => ({ ...e, id: edgeId(e) })));
      setSource(s.source);
      setFileName(s.fileName);
    },
    [setNodes, setEdges],
  );
  const undo = useUndo(snapshot, restoreSnapshot);

  const copy = () => {
    const picked = nodes.filter((n) => n.selected);
    if (!picked.length) return;
    const ids = new Set(picked.map((n) => n.id));
    const clip = { nodes: picked.map(plainNode), edges: edges.filter((e) => ids.has(e.target)).map(plainEdge) };
    localStorage.setItem(CLIPBOARD_KEY, JSON.stringify(clip));
    say('info', `Copied ${picked.length} node${picked.length === 1 ? '' : 's'}`);
  };

  /** Pastes the copied nodes with fresh ids, their edges among themselves, and
   * with `keepInputs` (Ctrl+Shift+V) the edges that fed them from outside. */
  const paste = (keepInputs) => {
    let clip;
    try {
      clip = JSON.parse(localStorage.getItem(CLIPBOARD_KEY) || 'null');
    } catch {
      clip = null;
    }
    if (!clip?.nodes?.length) return;
    const taken = new Set(nodes.map((n) => n.id));
    const rename = new Map();
    for (const n of clip.nodes) {
      const id = freshId(n.type, taken);
      taken.add(id);
      rename.set(n.id, id);
    }
    const existing = new Set(nodes.map((n) => n.id));
    const pasted = clip.nodes.map((n) => ({
      ...toFlowNode({ ...n, id: rename.get(n.id), position: { x: n.position.x + 60, y: n.position.y + 60 } }),
      selected: true,
    }));
    const newEdges = clip.edges
      .filter((e) => rename.has(e.source) || (keepInputs && existing.has(e.source)))
      .map((e) => {
        const c = { ...e, source: rename.get(e.source) ?? e.source, target: rename.get(e.target) };
        return { ...c, id: edgeId(c) };
      });
    setNodes((ns) => [...ns.map((n) => ({ ...n, selected: false })), ...pasted]);
    setEdges((es) => [...es, ...newEdges]);
    say('info', `Pasted ${pasted.length} node${pasted.length === 1 ? '' : 's'}`);
  };

  // ---- load and save -----------------------------------------------------------

  const load = useCallback(
    (text, name, params, quiet) => {
      try {
        const parsed = fromYaml(text, (type) => {
          const spec = specFor(type);
          return spec ? 90 + 56 * spec.inputs.length + 30 * spec.outputs.length : 200;
        });
        const loadedDecls = paramDecls(parsed.doc);
        const declared = new Set(loadedDecls.map((d) => d.name));
        const given = Object.fromEntries(Object.entries(params || {}).filter(([k]) => declared.has(k)));
        setSource(text);
        setNodes(parsed.nodes.map(toFlowNode));
        setEdges(parsed.edges.map((e) => ({ ...e, id: edgeId(e) })));
        setParamValues({ ...defaultsOf(loadedDecls), ...given });
        setRandomize(new Set());
        setFileName(name || 'workflow.yaml');
        setRunNodes({});
        setOutputs({});
        setShown(null);
        shownRef.current = null;
        const vp = parsed.doc.ui?.viewport;
        // Fit once React Flow has measured the new nodes.
        setTimeout(() => (vp && Number.isFinite(vp.zoom) ? flow.setViewport(vp) : flow.fitView({ padding: 0.1 })), 100);
        if (!quiet) say('info', `Loaded ${name || 'the workflow'}: ${parsed.nodes.length} nodes`);
        return true;
      } catch (err) {
        say('error', `Cannot load ${name || 'that'}: ${err.message}`);
        return false;
      }
    },
    [flow, say, setEdges, setNodes, specFor],
  );

  /** A dropped or picked file: a workflow (YAML or JSON) or a PNG that
   * pixart-flow wrote (its workflow and params come back). */
  const loadFile = async (file) => {
    const bytes = new Uint8Array(await file.arrayBuffer());
    if (isPng(bytes)) {
      try {
        const { workflow, params } = await workflowFromPng(bytes, file.name);
        const yamlName = file.name.replace(/\.png$/i, '.yaml');
        if (load(workflow, yamlName, params, true)) {
          say('info', `Restored the workflow of ${file.name} (${Object.keys(params).length} params)`);
        }
      } catch (err) {
        say('error', `Cannot load ${file.name}: ${err.message}`);
      }
      return;
    }
    if (/\.(jpe?g|gif|webp|bmp|safetensors|bin|pt|pth)$/i.test(file.name)) {
      say('error', `Cannot load ${file.name}: only workflows (.yaml) and PNGs written by pixart-flow carry a workflow`);
      return;
    }
    load(new TextDecoder().decode(bytes), file.name);
  };

  const currentYaml = useCallback(
    () => toYaml(source, nodes.map(plainNode), edges, flow.getViewport()),
    [source, nodes, edges, flow],
  );

  const save = () => {
    if (!nodes.length) return;
    const blob = new Blob([currentYaml()], { type: 'application/yaml' });
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = fileName;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  };

  const onDrop = (e) => {
    e.preventDefault();
    const type = e.dataTransfer.getData('application/x-pixart-node');
    if (type) {
      addNode(type, flow.screenToFlowPosition({ x: e.clientX, y: e.clientY }));
      return;
    }
    const file = e.dataTransfer.files?.[0];
    if (file) loadFile(file);
  };

  // ---- autosave: the canvas survives a reload ------------------------------------

  useEffect(() => {
    if (!specs.length || restored.current) return;
    restored.current = true;
    try {
      const saved = JSON.parse(localStorage.getItem(AUTOSAVE_KEY) || 'null');
      if (saved?.yaml && load(saved.yaml, saved.fileName, saved.params, true)) {
        setSource(saved.source ?? saved.yaml);
        setRandomize(new Set(saved.randomize || []));
        say('info', `Restored your canvas (${saved.fileName || 'workflow'}) from the last visit`);
      }
    } catch {
      /* nothing saved, or from an older editor */
    }
  }, [specs, load, say]);

  useEffect(() => {
    if (!restored.current) return undefined;
    const timer = setTimeout(() => {
      try {
        if (!nodes.length && !source) localStorage.removeItem(AUTOSAVE_KEY);
        else localStorage.setItem(AUTOSAVE_KEY, JSON.stringify({ yaml: currentYaml(), source, fileName, params: paramValues, randomize: [...randomize] }));
      } catch {
        /* storage full or disabled: the canvas is not kept */
      }
    }, 500);
    return () => clearTimeout(timer);
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [snapshot, paramValues, randomize]);

  // ---- validate as you edit ----------------------------------------------------

  const runParams = useCallback(
    (values = paramValues) => Object.fromEntries(Object.entries(values).filter(([k, v]) => v !== undefined && decls.some((d) => d.name === k))),
    [paramValues, decls],
  );

  // Positions do not change what runs: validate on types, values, edges and params.
  const semanticKey = useMemo(
    () => JSON.stringify([nodes.map((n) => [n.id, n.data.nodeType, n.data.values]), edges.map(edgeId), doc.params, paramValues]),
    [nodes, edges, doc, paramValues],
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
        const sent = currentYaml();
        const result = await api.validate(sent, runParams());
        setFindings(mapFindings(result.diagnostics || [], sent, source));
        setValid(result.ok);
      } catch (e) {
        setValid(null);
        say('error', `validation failed: ${e}`);
      }
    }, 300);
    return () => clearTimeout(timer);
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [semanticKey, specs]);

  // ---- runs, the queue and the gallery ------------------------------------------

  const refreshQueue = useCallback(() => api.queue().then(setQueue).catch(() => {}), []);
  const refreshHistory = useCallback(() => api.history().then(setRecords).catch(() => {}), []);
  useEffect(() => {
    refreshQueue();
    refreshHistory();
  }, [refreshQueue, refreshHistory]);

  /** The nodes a run of the canvas needs: every output node and what feeds it. */
  const neededNodes = () => {
    const feeds = new Map();
    for (const e of edges) feeds.set(e.target, [...(feeds.get(e.target) || []), e.source]);
    const needed = new Set();
    const visit = (id) => {
      if (needed.has(id)) return;
      needed.add(id);
      for (const s of feeds.get(id) || []) visit(s);
    };
    for (const n of nodes) if (specFor(n.data.nodeType)?.output_node) visit(n.id);
    return needed;
  };

  const showRun = (id, status) => {
    shownRef.current = id;
    setShown({ id, status });
    setOutputs({});
    const needed = mine.current.get(id) || new Set();
    setRunNodes(Object.fromEntries(nodes.map((n) => [n.id, { state: needed.has(n.id) ? 'pending' : 'unused' }])));
    for (const ev of buffered.current.get(id) || []) apply.current(ev);
  };

  // Events of a run can arrive before the server's answer to the submit does:
  // keep recent ones per run and replay them once the run id is known.
  const buffered = useRef(new Map());
  const apply = useRef(null);
  const onEvent = useRef(null);
  onEvent.current = (ev) => {
    if (['run_queued', 'run_started', 'run_finished', 'run_cancelled', 'queue_changed'].includes(ev.event)) refreshQueue();
    if (ev.event === 'run_finished' || ev.event === 'run_cancelled') refreshHistory();
    if (!ev.run_id) return;
    const list = buffered.current.get(ev.run_id) || [];
    if (list.length < 2000) list.push(ev);
    buffered.current.set(ev.run_id, list);
    if (buffered.current.size > 50) buffered.current.delete(buffered.current.keys().next().value);
    // The canvas follows this page's runs as they start.
    if (ev.event === 'run_started' && mine.current.has(ev.run_id) && shownRef.current !== ev.run_id) {
      showRun(ev.run_id, 'running');
      return;
    }
    if (ev.run_id === shownRef.current) apply.current?.(ev);
  };
  useEffect(() => api.events((ev) => onEvent.current(ev), setOnline), []);

  apply.current = (ev) => {
    const node = (state, extra = {}) =>
      setRunNodes((r) => ({ ...r, [ev.node]: { ...(r[ev.node] || {}), state, ...extra } }));
    switch (ev.event) {
      case 'run_started':
        setShown((r) => ({ ...r, status: 'running' }));
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
    setShown((r) => (r?.id === runId ? { ...r, status } : r));
    if (status === 'cancelled') {
      setRunNodes((r) =>
        Object.fromEntries(Object.entries(r).map(([k, v]) => [k, v.state === 'running' || v.state === 'pending' ? { ...v, state: 'cancelled' } : v])),
      );
    }
    const record = await api.run(runId);
    if (shownRef.current !== runId) return;
    const byNode = {};
    for (const f of record ? imagesOf(record) : []) byNode[f.node] = [...(byNode[f.node] || []), f];
    setOutputs(byNode);
  };

  /** Queues the canvas with the params panel's values (a fresh seed first where
   * the panel says so). */
  const start = async () => {
    if (!nodes.length) return;
    let values = paramValues;
    const fresh = decls.filter((d) => isSeed(d) && randomize.has(d.name));
    if (fresh.length) {
      values = { ...values, ...Object.fromEntries(fresh.map((d) => [d.name, randomSeed(d)])) };
      setParamValues(values);
    }
    const sent = currentYaml();
    const needed = neededNodes();
    const res = await api.submit(sent, runParams(values));
    if (!res.run_id) {
      const mapped = mapFindings(res.diagnostics || [], sent, source);
      if (res.diagnostics) setFindings(mapped);
      const errors = mapped.filter((d) => d.severity === 'error');
      const first = errors[0];
      const where = first ? `${first.line ? `line ${first.line}: ` : ''}${first.node ? `${first.node}${first.port ? `.${first.port}` : ''}: ` : first.port ? `param ${first.port}: ` : ''}` : '';
      say(
        'error',
        first
          ? `Not queued: ${errors.length} error${errors.length === 1 ? '' : 's'} in the workflow. ${where}${first.message}`
          : `Not queued: ${res.error}`,
      );
      return;
    }
    mine.current.set(res.run_id, needed);
    if (mine.current.size > 200) mine.current.delete(mine.current.keys().next().value);
    refreshQueue();
    const current = shown && (shown.status === 'queued' || shown.status === 'running');
    if (!current) showRun(res.run_id, 'queued');
    else say('info', `Queued ${res.run_id}`);
  };

  const stop = async () => {
    if (shown?.id) await api.cancel(shown.id);
  };

  const cancelRun = async (id) => {
    const res = await api.cancel(id);
    if (!res.ok) say('error', res.data?.error || `cannot stop ${id}`);
    refreshQueue();
  };
  const moveRun = async (id, position) => {
    const res = await api.move(id, position);
    if (!res.ok) say('error', res.data?.error || `cannot move ${id}`);
    refreshQueue();
  };
  const pauseQueue = async (paused) => {
    const res = await (paused ? api.pause() : api.resume());
    if (!res.ok) say('error', res.data?.error || 'the server did not change the queue');
    refreshQueue();
  };

  const openRecord = (record) => {
    if (!record.workflow) return;
    if (load(record.workflow, `${record.name || 'workflow'}.yaml`, record.params, true)) {
      say('info', `Opened the workflow of ${record.id}`);
      setTab('params');
    }
  };

  const openParam = (name) => {
    setTab('params');
    setTimeout(() => document.getElementById(`param-${name}`)?.focus(), 50);
  };

  // ---- keys --------------------------------------------------------------------

  const keys = useRef(null);
  keys.current = (e) => {
    const mod = e.ctrlKey || e.metaKey;
    if (!mod) return;
    const key = e.key.toLowerCase();
    if (key === 'enter') {
      e.preventDefault();
      start();
    } else if (key === 's') {
      e.preventDefault();
      save();
    } else if (inTextField(document.activeElement)) {
      // Text fields keep their own undo, copy and paste.
    } else if (key === 'z' && !e.shiftKey) {
      e.preventDefault();
      undo.undo();
    } else if ((key === 'z' && e.shiftKey) || key === 'y') {
      e.preventDefault();
      undo.redo();
    } else if (key === 'c') {
      copy();
    } else if (key === 'v') {
      e.preventDefault();
      paste(e.shiftKey);
    }
  };
  useEffect(() => {
    const handler = (e) => keys.current(e);
    window.addEventListener('keydown', handler);
    return () => window.removeEventListener('keydown', handler);
  }, []);

  const onCanvasDoubleClick = (e) => {
    if (!e.target.classList?.contains('react-flow__pane')) return;
    const box = e.currentTarget.getBoundingClientRect();
    setQuickAdd({
      screen: { x: e.clientX - box.left, y: e.clientY - box.top },
      flow: flow.screenToFlowPosition({ x: e.clientX, y: e.clientY }),
    });
  };

  const running = shown && (shown.status === 'queued' || shown.status === 'running');
  const connected = useMemo(() => new Set(edges.map((e) => `${e.target}\u0000${e.targetHandle}`)), [edges]);
  const context = { specFor, findings, runNodes, connected, outputs, setValue, paramValues, openParam, say };
  const errors = findings.filter((d) => d.severity === 'error');
  const waiting = queue.runs.filter((r) => r.state === 'queued').length;

  return (
    <EditorContext.Provider value={context}>
      <div className="app">
        <header className="toolbar">
          <span className="brand">pixart-flow</span>
          <button type="button" onClick={() => fileInput.current?.click()} title="a workflow (.yaml) or a PNG pixart-flow wrote">Load…</button>
          <input
            ref={fileInput}
            type="file"
            accept=".yaml,.yml,.json,.png,application/yaml,image/png"
            hidden
            data-testid="load-file"
            onChange={(e) => {
              const f = e.target.files?.[0];
              if (f) loadFile(f);
              e.target.value = '';
            }}
          />
          <button type="button" onClick={save} disabled={!nodes.length} title="Ctrl+S">Save YAML</button>
          <button type="button" onClick={undo.undo} disabled={!undo.canUndo} title="Ctrl+Z" aria-label="undo">↶</button>
          <button type="button" onClick={undo.redo} disabled={!undo.canRedo} title="Ctrl+Shift+Z" aria-label="redo">↷</button>
          <span className={`validity ${valid === true ? 'ok' : valid === false ? 'bad' : ''}`} data-testid="validity">
            {valid === true ? 'valid' : valid === false ? `${errors.length} error${errors.length === 1 ? '' : 's'}` : '—'}
          </span>
          <button type="button" className="primary" onClick={start} disabled={!nodes.length} title="Ctrl+Enter: queue a run">Run</button>
          <button type="button" onClick={stop} disabled={!running}>Cancel</button>
          <span className="run-status" data-testid="run-status">{shown ? `run ${shown.id}: ${shown.status}` : ''}</span>
          {waiting > 0 && <span className="queued-badge">{waiting} waiting</span>}
          <span className={`online ${online ? 'on' : ''}`} title="event stream">{online ? '● live' : '○ offline'}</span>
        </header>
        <Palette specs={specs} onAdd={(t) => addNode(t)} />
        <main className="canvas" onDragOver={(e) => e.preventDefault()} onDrop={onDrop} onDoubleClick={onCanvasDoubleClick}>
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
            zoomOnDoubleClick={false}
            minZoom={0.1}
            defaultViewport={{ x: 0, y: 0, zoom: 0.8 }}
          >
            <Background />
            <Controls />
            <MiniMap pannable zoomable />
          </ReactFlow>
          {nodes.length === 0 && (
            <div className="empty-hint" data-testid="empty-hint">
              <strong>An empty canvas.</strong>
              <span>Drag nodes from the palette, or double-click here to search for one.</span>
              <span>Drop a workflow (.yaml) or a PNG made by pixart-flow to open it.</span>
            </div>
          )}
          {quickAdd && (
            <QuickAdd at={quickAdd.screen} specs={specs} onAdd={(t) => addNode(t, quickAdd.flow)} onClose={() => setQuickAdd(null)} />
          )}
          <Toasts toasts={toasts} dismiss={dismiss} />
        </main>
        <aside className="side">
          <section className="findings-box">
            <h3>Findings</h3>
            {findings.length === 0 && <p className="muted">{valid ? 'No problems.' : 'Nothing to report.'}</p>}
            <ul className="findings">
              {findings.map((d, i) => (
                <li key={i} className={d.severity}>
                  {d.line ? `line ${d.line}: ` : d.added ? '(not in the file yet) ' : ''}
                  {d.node ? `${d.node}${d.port ? `.${d.port}` : ''}: ` : d.port ? `param ${d.port}: ` : ''}
                  {d.message}
                  {d.help ? <span className="muted"> ({d.help})</span> : null}
                </li>
              ))}
            </ul>
          </section>
          <nav className="tabs" role="tablist">
            {[
              ['params', `Params${decls.length ? ` (${decls.length})` : ''}`],
              ['queue', `Queue${queue.runs.length ? ` (${queue.runs.length})` : ''}`],
              ['gallery', 'Gallery'],
            ].map(([key, label]) => (
              <button key={key} type="button" role="tab" data-tab={key} aria-selected={tab === key} className={tab === key ? 'active' : ''} onClick={() => setTab(key)}>
                {label}
              </button>
            ))}
          </nav>
          <div className="tab-body">
            {tab === 'params' && (
              <ParamsPanel
                decls={decls}
                values={paramValues}
                setValue={(name, v) => setParamValues((p) => ({ ...p, [name]: v }))}
                randomize={randomize}
                setRandomize={setRandomize}
              />
            )}
            {tab === 'queue' && <QueuePanel queue={queue} onCancel={cancelRun} onMove={moveRun} onPause={pauseQueue} />}
            {tab === 'gallery' && <GalleryPanel records={records} onOpen={openRecord} />}
          </div>
        </aside>
      </div>
    </EditorContext.Provider>
  );
}
