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

export const catalog = async () => (await request('GET', 'api/nodes')).data ?? [];

/** {ok, diagnostics} from the server's validator. */
export async function validate(yaml) {
  const { data } = await request('POST', 'api/validate', yaml);
  return data ?? { ok: false, diagnostics: [] };
}

/** Queues a run: {run_id} or {error | diagnostics}. */
export async function submit(yaml) {
  const { ok, data } = await request('POST', 'api/runs', yaml);
  return ok ? data : { error: data?.error || 'the server refused the run', diagnostics: data?.diagnostics };
}

export async function cancel(runId) {
  return request('POST', `api/runs/${encodeURIComponent(runId)}/cancel`);
}

export async function run(runId) {
  return (await request('GET', `api/runs/${encodeURIComponent(runId)}`)).data;
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
