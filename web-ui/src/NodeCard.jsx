import { Handle, Position } from '@xyflow/react';
import YAML from 'yaml';
import { useEditor } from './context.js';
import { isEnum, isList, isLiteral, typeClass, typeName } from './types.js';
import { fileUrl, upload } from './api.js';

const PARAM_REF = /^\$\{params\.([A-Za-z_][A-Za-z0-9_-]*)\}$/;

/** Inputs that name an image file to read: they get an upload button. */
const IMAGE_PATHS = { 'image.load': ['path'] };

/** An input fed by a param: shows the param's value (edited in the params
 * panel); "unlink" writes that value on the node instead. */
function ParamRef({ nodeId, input, name }) {
  const { paramValues, openParam, setValue } = useEditor();
  const value = paramValues[name];
  const text = value === undefined ? '(no value)' : typeof value === 'string' ? value : JSON.stringify(value);
  return (
    <div className="param-ref nodrag" data-port={input.name} data-param-ref={name}>
      <button type="button" className="link" title={`set in the params panel: ${text}`} onClick={() => openParam(name)}>
        ⟵ params.{name}
      </button>
      <span className="param-ref-value">{text}</span>
      <button
        type="button"
        className="link unlink"
        title="use a value on this node instead of the param"
        onClick={() => setValue(nodeId, input.name, value)}
      >
        unlink
      </button>
    </div>
  );
}

function UploadButton({ nodeId, input }) {
  const { setValue, say } = useEditor();
  return (
    <label className="upload nodrag" title="send an image to the server and use it here">
      Upload…
      <input
        type="file"
        accept="image/png,image/jpeg"
        hidden
        data-upload={`${nodeId}.${input.name}`}
        onChange={async (e) => {
          const file = e.target.files?.[0];
          e.target.value = '';
          if (!file) return;
          const res = await upload(file);
          if (res.error) say('error', `Cannot upload ${file.name}: ${res.error}`);
          else {
            setValue(nodeId, input.name, res.path);
            say('info', `Uploaded ${file.name} as ${res.path}`);
          }
        }}
      />
    </label>
  );
}

/** What hovering a port says: its declaration (type, default, range, choices). */
export function portTip(input, finding) {
  const lines = [`${input.name}: ${typeName(input.type)}${input.required ? ' (required)' : ''}`];
  if (input.description) lines.push(input.description);
  if (input.default !== undefined) lines.push(`default: ${JSON.stringify(input.default)}`);
  const range = [input.min !== undefined && `min ${input.min}`, input.max !== undefined && `max ${input.max}`].filter(Boolean).join(', ');
  if (range) lines.push(range);
  if (isEnum(input.type)) lines.push(`one of: ${input.type.enum.join(', ')}`);
  if (finding) lines.unshift(`${finding.severity}: ${finding.message}`);
  return lines.join('\n');
}

/** A widget for a literal input: honours the declared default, range and choices. */
function Widget({ nodeId, input, value }) {
  const { setValue } = useEditor();
  const t = input.type;
  const current = value === undefined ? input.default : value;
  const set = (v) => setValue(nodeId, input.name, v);
  const common = { 'aria-label': `${nodeId}.${input.name}`, className: 'nodrag widget', 'data-port': input.name };
  const ref = typeof current === 'string' ? PARAM_REF.exec(current.trim()) : null;
  if (ref) return <ParamRef nodeId={nodeId} input={input} name={ref[1]} />;
  // A value that refers to a param (`${params.steps}`) or interpolates stays
  // text; typing a plain number turns it back into one.
  if (typeof current === 'string' && current.includes('${')) {
    return (
      <input
        {...common}
        type="text"
        value={current}
        onChange={(e) => {
          const v = e.target.value;
          if ((t === 'int' || t === 'float') && /^-?\d+(\.\d+)?$/.test(v.trim())) set(Number(v));
          else set(v === '' ? undefined : v);
        }}
      />
    );
  }
  if (isEnum(t)) {
    return (
      <select {...common} value={current ?? ''} onChange={(e) => set(e.target.value)}>
        {current === undefined && <option value="">—</option>}
        {t.enum.map((c) => (
          <option key={c} value={c}>{c}</option>
        ))}
      </select>
    );
  }
  if (t === 'bool') {
    return <input {...common} type="checkbox" checked={!!current} onChange={(e) => set(e.target.checked)} />;
  }
  if (t === 'int' || t === 'float') {
    return (
      <input
        {...common}
        type="number"
        step={t === 'int' ? 1 : 'any'}
        min={input.min}
        max={input.max}
        value={current ?? ''}
        placeholder={input.required ? 'required' : ''}
        onChange={(e) => {
          if (e.target.value === '') return set(undefined);
          const n = Number(e.target.value);
          if (!Number.isNaN(n)) set(t === 'int' ? Math.trunc(n) : n);
        }}
      />
    );
  }
  if (isList(t)) {
    const text = current === undefined ? '' : YAML.stringify(current, { flow: true }).trim();
    return (
      <input
        {...common}
        type="text"
        defaultValue={text}
        placeholder="[1, 2, 3]"
        onBlur={(e) => {
          try {
            const v = e.target.value.trim() === '' ? undefined : YAML.parse(e.target.value);
            set(v);
          } catch {
            set(e.target.value);
          }
        }}
      />
    );
  }
  return (
    <input
      {...common}
      type="text"
      value={current ?? ''}
      placeholder={input.required ? 'required' : ''}
      onChange={(e) => set(e.target.value === '' ? undefined : e.target.value)}
    />
  );
}

const STATE_LABEL = {
  pending: 'waiting',
  running: 'running',
  done: 'done',
  cached: 'cached',
  failed: 'failed',
  skipped: 'skipped',
  cancelled: 'cancelled',
  unused: 'not needed by this run',
};

export default function NodeCard({ id, data, selected }) {
  const { specFor, findings, runNodes, connected, outputs } = useEditor();
  const spec = specFor(data.nodeType);
  const nodeFindings = findings.filter((d) => d.node === id);
  const portFinding = (port) => nodeFindings.find((d) => d.port === port);
  const state = runNodes[id];
  const files = outputs[id] || [];
  const classes = ['node-card'];
  if (selected) classes.push('selected');
  if (nodeFindings.some((d) => d.severity === 'error')) classes.push('has-error');
  if (state) classes.push(`state-${state.state}`);

  return (
    <div className={classes.join(' ')} data-node={id} data-state={state?.state ?? 'idle'}>
      <header title={spec?.description || undefined}>
        <strong>{data.title || id}</strong>
        <span className="node-type">{data.nodeType}</span>
      </header>
      {!spec && <div className="finding error">unknown node type {data.nodeType}</div>}
      {spec && (
        <div className="ports">
          {spec.inputs.map((input) => {
            const finding = portFinding(input.name);
            const wired = connected.has(`${id}\u0000${input.name}`);
            return (
              <div key={input.name} className={`port in${finding ? ' port-error' : ''}`} title={portTip(input, finding)}>
                <Handle
                  type="target"
                  position={Position.Left}
                  id={input.name}
                  className={`t-${typeClass(input.type)}`}
                />
                <label>
                  {input.name}
                  {input.required && !wired && data.values[input.name] === undefined ? ' *' : ''}
                  <span className="port-type">{typeName(input.type)}</span>
                </label>
                {!wired && isLiteral(input.type) && (
                  <Widget nodeId={id} input={input} value={data.values[input.name]} />
                )}
                {!wired && IMAGE_PATHS[data.nodeType]?.includes(input.name) && <UploadButton nodeId={id} input={input} />}
              </div>
            );
          })}
          {spec.outputs.map((output) => (
            <div key={output.name} className="port out" title={[`${output.name}: ${typeName(output.type)}`, output.description].filter(Boolean).join('\n')}>
              <label>
                <span className="port-type">{typeName(output.type)}</span>
                {output.name}
              </label>
              <Handle type="source" position={Position.Right} id={output.name} className={`t-${typeClass(output.type)}`} />
            </div>
          ))}
        </div>
      )}
      {state && (
        <div className="run-state">
          <span className="state-label">{STATE_LABEL[state.state] || state.state}</span>
          {state.state === 'running' && state.max > 0 && (
            <progress max={state.max} value={state.value} aria-label={`${id} progress`} />
          )}
          {state.detail && <span className="detail">{state.detail}</span>}
          {state.error && <div className="finding error">{state.error}</div>}
          {state.preview && !files.length && (
            <img className="preview" src={state.preview} alt={`${id} preview at step ${state.previewStep}`} title={`step ${state.previewStep}`} />
          )}
        </div>
      )}
      {nodeFindings
        .filter((d) => !d.port)
        .map((d, i) => (
          <div key={i} className={`finding ${d.severity}`}>{d.message}</div>
        ))}
      {files.length > 0 && (
        <div className="previews">
          {files.map((f) => (
            <a key={f.id} href={fileUrl(f.id)} target="_blank" rel="noreferrer">
              <img className="output-image" src={fileUrl(f.id)} alt={`output of ${id}`} />
            </a>
          ))}
        </div>
      )}
    </div>
  );
}
