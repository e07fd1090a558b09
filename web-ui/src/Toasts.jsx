import { useCallback, useRef, useState } from 'react';

/** How long a message stays, ms: errors longer, so they can be read. */
const LIFETIME = { info: 4000, error: 9000 };

/** Messages at the bottom of the canvas, newest first; each goes away by itself
 * or when clicked. */
export function useToasts() {
  const [toasts, setToasts] = useState([]);
  const next = useRef(1);
  const dismiss = useCallback((id) => setToasts((ts) => ts.filter((t) => t.id !== id)), []);
  const say = useCallback(
    (kind, text) => {
      const id = next.current++;
      setToasts((ts) => [{ id, kind, text }, ...ts].slice(0, 4));
      setTimeout(() => dismiss(id), LIFETIME[kind] ?? LIFETIME.info);
    },
    [dismiss],
  );
  return { toasts, say, dismiss };
}

export function Toasts({ toasts, dismiss }) {
  if (!toasts.length) return null;
  return (
    <div className="toasts">
      {toasts.map((t) => (
        <div key={t.id} className={`toast ${t.kind}`} role="status" data-testid="toast" onClick={() => dismiss(t.id)}>
          {t.text}
        </div>
      ))}
    </div>
  );
}
