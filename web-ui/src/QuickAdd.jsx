import { useMemo, useState } from 'react';

/** The search that double-clicking the canvas opens at the pointer: type, then
 * Enter (or click) adds the node there; Escape closes. */
export default function QuickAdd({ at, specs, onAdd, onClose }) {
  const [query, setQuery] = useState('');
  const [active, setActive] = useState(0);
  const matches = useMemo(() => {
    const words = query.trim().toLowerCase().split(/\s+/).filter(Boolean);
    return specs
      .filter((s) => {
        const hay = `${s.name} ${s.category} ${s.description}`.toLowerCase();
        return words.every((w) => hay.includes(w));
      })
      // Name matches before description matches.
      .sort((a, b) => Number(!a.name.includes(words[0] ?? '')) - Number(!b.name.includes(words[0] ?? '')))
      .slice(0, 10);
  }, [specs, query]);
  const choose = (spec) => {
    if (spec) onAdd(spec.name);
    onClose();
  };
  return (
    <div className="quick-add" style={{ left: at.x, top: at.y }} data-testid="quick-add">
      <input
        autoFocus
        type="search"
        placeholder="Add a node…"
        aria-label="Add a node"
        value={query}
        onChange={(e) => {
          setQuery(e.target.value);
          setActive(0);
        }}
        onBlur={() => setTimeout(onClose, 150)}
        onKeyDown={(e) => {
          if (e.key === 'Escape') onClose();
          else if (e.key === 'Enter') choose(matches[active]);
          else if (e.key === 'ArrowDown') setActive((i) => Math.min(i + 1, matches.length - 1));
          else if (e.key === 'ArrowUp') setActive((i) => Math.max(i - 1, 0));
          else return;
          e.preventDefault();
        }}
      />
      <ul>
        {matches.map((s, i) => (
          <li
            key={`${s.name}@${s.version}`}
            className={i === active ? 'active' : ''}
            data-type={s.name}
            title={s.description}
            onMouseDown={(e) => {
              e.preventDefault();
              choose(s);
            }}
          >
            {s.name}
            <span className="muted"> {s.category}</span>
          </li>
        ))}
        {matches.length === 0 && <li className="muted">No node matches.</li>}
      </ul>
    </div>
  );
}
