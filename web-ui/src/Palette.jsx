import { useMemo, useState } from 'react';

/** Node types from the catalog, grouped by category, with search. Drag one onto
 * the canvas (or double-click it) to add it. */
export default function Palette({ specs, onAdd }) {
  const [query, setQuery] = useState('');
  const groups = useMemo(() => {
    const q = query.trim().toLowerCase();
    const map = new Map();
    for (const s of specs) {
      const hay = `${s.name} ${s.category} ${s.description}`.toLowerCase();
      if (q && !q.split(/\s+/).every((w) => hay.includes(w))) continue;
      const cat = s.category || 'other';
      if (!map.has(cat)) map.set(cat, []);
      map.get(cat).push(s);
    }
    return [...map.entries()].sort(([a], [b]) => a.localeCompare(b));
  }, [specs, query]);

  return (
    <aside className="palette">
      <input
        className="search"
        type="search"
        placeholder="Search nodes…"
        value={query}
        onChange={(e) => setQuery(e.target.value)}
        aria-label="Search nodes"
      />
      {groups.map(([category, items]) => (
        <section key={category}>
          <h3>{category}</h3>
          {items.map((s) => (
            <div
              key={`${s.name}@${s.version}`}
              className="palette-item"
              data-type={s.name}
              title={s.description}
              draggable
              onDragStart={(e) => {
                e.dataTransfer.setData('application/x-pixart-node', s.name);
                e.dataTransfer.effectAllowed = 'move';
              }}
              onDoubleClick={() => onAdd(s.name)}
            >
              {s.name}
            </div>
          ))}
        </section>
      ))}
      {groups.length === 0 && <p className="muted">No node matches.</p>}
    </aside>
  );
}
