/** The workflow's `params:` as a form: what a run gets, as `--set` gives it on
 * the command line. Node inputs that refer to a param (`${params.prompt}`) keep
 * the reference; the value lives here. */

const LONG_TEXT = /prompt|negative|caption|text|description/i;
export const isSeed = (decl) => decl.type === 'int' && /seed/i.test(decl.name);

/** A fresh value for a seed param within its declared range. */
export function randomSeed(decl) {
  const lo = Number.isFinite(decl.min) ? decl.min : 0;
  const hi = Number.isFinite(decl.max) ? decl.max : 2 ** 31 - 1;
  return lo + Math.floor(Math.random() * (hi - lo + 1));
}

function Field({ decl, value, set }) {
  const common = { id: `param-${decl.name}`, 'data-param': decl.name, 'aria-label': `param ${decl.name}` };
  const shown = value === undefined ? '' : value;
  if (decl.type === 'enum' || decl.choices) {
    return (
      <select {...common} value={shown} onChange={(e) => set(e.target.value)}>
        {value === undefined && <option value="">—</option>}
        {(decl.choices || []).map((c) => (
          <option key={c} value={c}>{c}</option>
        ))}
      </select>
    );
  }
  if (decl.type === 'bool') {
    return <input {...common} type="checkbox" checked={!!value} onChange={(e) => set(e.target.checked)} />;
  }
  if (decl.type === 'int' || decl.type === 'float') {
    return (
      <input
        {...common}
        type="number"
        step={decl.type === 'int' ? 1 : 'any'}
        min={decl.min}
        max={decl.max}
        value={shown}
        placeholder={decl.default === undefined ? 'required' : String(decl.default)}
        onChange={(e) => {
          if (e.target.value === '') return set(undefined);
          const n = Number(e.target.value);
          if (!Number.isNaN(n)) set(decl.type === 'int' ? Math.trunc(n) : n);
        }}
      />
    );
  }
  if (decl.type === 'string' && LONG_TEXT.test(decl.name)) {
    return (
      <textarea
        {...common}
        rows={/negative/i.test(decl.name) ? 2 : 4}
        value={shown}
        placeholder={decl.default === undefined ? 'required' : ''}
        onChange={(e) => set(e.target.value)}
      />
    );
  }
  return (
    <input
      {...common}
      type="text"
      value={shown}
      placeholder={decl.default === undefined ? 'required' : String(decl.default)}
      onChange={(e) => set(e.target.value === '' && decl.default === undefined ? undefined : e.target.value)}
    />
  );
}

const rangeText = (d) =>
  [d.min !== undefined && `≥ ${d.min}`, d.max !== undefined && `≤ ${d.max}`].filter(Boolean).join(', ');

export default function ParamsPanel({ decls, values, setValue, randomize, setRandomize }) {
  if (!decls.length) {
    return <p className="muted">This workflow declares no <code>params:</code>. Values are set on the nodes.</p>;
  }
  return (
    <div className="params">
      {decls.map((d) => {
        const value = values[d.name];
        const changed = value !== undefined && JSON.stringify(value) !== JSON.stringify(d.default);
        return (
          <div key={d.name} className="param" data-param-row={d.name}>
            <label htmlFor={`param-${d.name}`} title={d.description || undefined}>
              <span className="param-name">{d.name}</span>
              <span className="port-type">{d.type}{rangeText(d) ? ` ${rangeText(d)}` : ''}</span>
              {changed && (
                <button type="button" className="link" title={`back to the default (${JSON.stringify(d.default)})`} onClick={() => setValue(d.name, d.default)}>
                  ↺ default
                </button>
              )}
            </label>
            <Field decl={d} value={value} set={(v) => setValue(d.name, v)} />
            {d.description && <div className="param-help muted">{d.description}</div>}
            {isSeed(d) && (
              <div className="seed-tools">
                <label>
                  <input
                    type="checkbox"
                    data-randomize={d.name}
                    checked={randomize.has(d.name)}
                    onChange={(e) => {
                      const next = new Set(randomize);
                      if (e.target.checked) next.add(d.name);
                      else next.delete(d.name);
                      setRandomize(next);
                    }}
                  />
                  randomise each run
                </label>
                <button type="button" className="link" onClick={() => setValue(d.name, randomSeed(d))}>new seed</button>
              </div>
            )}
          </div>
        );
      })}
    </div>
  );
}
