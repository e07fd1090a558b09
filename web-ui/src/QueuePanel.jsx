/** The server's queue: the running runs, then the waiting ones in the order they
 * will start; cancel any, move waiting ones, pause starting new ones. */

const promptOf = (r) => {
  const p = r.params?.prompt;
  return typeof p === 'string' && p ? p : null;
};

export default function QueuePanel({ queue, onCancel, onMove, onPause }) {
  const waiting = queue.runs.filter((r) => r.state === 'queued');
  return (
    <div className="queue">
      <div className="queue-bar">
        <span data-testid="queue-count">
          {queue.runs.length === 0 ? 'Nothing queued.' : `${queue.runs.length - waiting.length} running, ${waiting.length} waiting`}
        </span>
        <button type="button" onClick={() => onPause(!queue.paused)} data-testid="queue-pause">
          {queue.paused ? '▶ Resume queue' : '⏸ Pause queue'}
        </button>
      </div>
      {queue.paused && <p className="muted">Paused: no new run starts until you resume; running ones go on.</p>}
      <ol className="queue-list">
        {queue.runs.map((r) => {
          const index = waiting.indexOf(r);
          return (
            <li key={r.id} className={`queue-item ${r.state}`} data-run={r.id} data-state={r.state}>
              <div className="queue-line">
                <strong>{r.name || 'workflow'}</strong>
                <span className="queue-state">{r.state}</span>
              </div>
              {promptOf(r) && <div className="queue-prompt" title={promptOf(r)}>{promptOf(r)}</div>}
              <div className="queue-actions">
                <span className="muted">{r.id}</span>
                {r.state === 'queued' && (
                  <>
                    <button type="button" aria-label={`move ${r.id} up`} disabled={index <= 0} onClick={() => onMove(r.id, index - 1)}>▲</button>
                    <button type="button" aria-label={`move ${r.id} down`} disabled={index === waiting.length - 1} onClick={() => onMove(r.id, index + 1)}>▼</button>
                  </>
                )}
                <button type="button" aria-label={`stop ${r.id}`} data-stop={r.id} onClick={() => onCancel(r.id)}>✕</button>
              </div>
            </li>
          );
        })}
      </ol>
    </div>
  );
}
