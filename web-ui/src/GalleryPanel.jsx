import { fileUrl } from './api.js';

/** Every finished run the server keeps, newest first: its images with prompt,
 * params and time; "Open" loads that run's workflow and params back. */

const IMAGE = /\.(png|jpe?g)$/i;

export const imagesOf = (record) =>
  (record.outputs || []).flatMap((o) => (o.files || []).filter((f) => IMAGE.test(f.path || '')).map((f) => ({ ...f, node: o.node })));

const when = (ms) => (ms ? new Date(ms).toLocaleString() : '');

const paramSummary = (params) =>
  Object.entries(params || {})
    .filter(([k]) => k !== 'prompt')
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
    .join(' · ');

export default function GalleryPanel({ records, onOpen }) {
  if (!records.length) return <p className="muted">Finished runs and their images appear here, and stay after a restart.</p>;
  return (
    <div className="gallery">
      {records.map((r) => {
        const images = imagesOf(r);
        return (
          <figure key={r.id} className={`gallery-item ${r.state}`} data-run={r.id}>
            {images.map((f) => (
              <a key={f.id} href={fileUrl(f.id)} target="_blank" rel="noreferrer">
                <img className="side-image" src={fileUrl(f.id)} alt={`${r.id} ${f.node}`} data-file={f.id} title={f.path} loading="lazy" />
              </a>
            ))}
            <figcaption>
              {typeof r.params?.prompt === 'string' && <div className="gallery-prompt">{r.params.prompt}</div>}
              <div className="muted">
                {r.name || 'workflow'} · {r.state} · {when(r.finished_at)}
              </div>
              {paramSummary(r.params) && <div className="muted gallery-params">{paramSummary(r.params)}</div>}
              {r.failures?.[0]?.message && <div className="finding error">{r.failures[0].message}</div>}
              <button type="button" className="link open-run" disabled={!r.workflow} title={r.workflow ? 'load this run’s workflow and params' : 'the server did not keep this run’s workflow'} onClick={() => onOpen(r)}>
                Open in the editor
              </button>
            </figcaption>
          </figure>
        );
      })}
    </div>
  );
}
