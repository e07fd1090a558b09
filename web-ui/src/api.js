// The server's JSON API and event stream (documented in the README; the same
// origin serves the editor).

async function request(method, path, body, type = 'application/yaml') {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers['content-type'] = type;
    init.body = body;
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let data;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text };
  }
  return { ok: res.ok, status: res.status, data };
}

const json = (method, path, value) => request(method, path, JSON.stringify(value), 'application/json');

export const catalog = async () => (await request('GET', 'api/nodes')).data ?? [];

/** {ok, diagnostics} from the server's validator, with the params a run would get. */
export async function validate(yaml, params = {}) {
  const { data } = await json('POST', 'api/validate', { workflow: yaml, params });
  return data ?? { ok: false, diagnostics: [] };
}

/** Queues a run: {run_id} or {error, diagnostics}. */
export async function submit(yaml, params = {}) {
  const { ok, status, data } = await json('POST', 'api/runs', { workflow: yaml, params });
  if (ok) return data;
  return { error: data?.error || `the server answered ${status}`, diagnostics: data?.diagnostics };
}

export async function cancel(runId) {
  return request('POST', `api/runs/${encodeURIComponent(runId)}/cancel`);
}

export async function run(runId) {
  return (await request('GET', `api/runs/${encodeURIComponent(runId)}`)).data;
}

/** {paused, runs}: the running runs, then the waiting ones in the order they will start. */
export async function queue() {
  const { ok, data } = await request('GET', 'api/queue');
  return ok && data ? data : { paused: false, runs: [] };
}

/** Moves a waiting run to `position` among the waiting runs. */
export const move = (runId, position) => json('POST', `api/runs/${encodeURIComponent(runId)}/move`, { position });

export const pause = () => request('POST', 'api/queue/pause');
export const resume = () => request('POST', 'api/queue/resume');

/** Finished runs, newest first. */
export async function history() {
  const { ok, data } = await request('GET', 'api/history');
  return ok && Array.isArray(data) ? data : [];
}

/** Stores an image on the server: {id, path} (the path a workflow reads it by) or {error}. */
export async function upload(file) {
  const type = /\.jpe?g$/i.test(file.name) ? 'image/jpeg' : 'image/png';
  const { ok, status, data } = await request('POST', 'api/uploads', file, type);
  return ok ? data : { error: data?.error || `the server answered ${status}` };
}

export const fileUrl = (id) => `api/files/${encodeURIComponent(id)}`;

/** Calls `onEvent` for every executor event; reconnects if the socket drops. */
export function events(onEvent, onStatus) {
  let socket;
  let closed = false;
  const open = () => {
    const url = new URL('api/events', window.location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    socket = new WebSocket(url);
    socket.onopen = () => onStatus?.(true);
    socket.onmessage = (m) => {
      try {
        onEvent(JSON.parse(m.data));
      } catch {
        /* not an event */
      }
    };
    socket.onclose = () => {
      onStatus?.(false);
      if (!closed) setTimeout(open, 1000);
    };
  };
  open();
  return () => {
    closed = true;
    socket?.close();
  };
}
