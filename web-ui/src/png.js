// What pixart-flow writes into its PNGs: the workflow (`pixart-workflow`) and the
// param values (`pixart-params`) as text chunks. Read here without decoding the
// image, so a dropped output restores the graph that made it.

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
export const WORKFLOW_KEY = 'pixart-workflow';
export const PARAMS_KEY = 'pixart-params';

export const isPng = (bytes) => SIGNATURE.every((b, i) => bytes[i] === b);

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

const zero = (bytes, from) => {
  const at = bytes.indexOf(0, from);
  return at < 0 ? bytes.length : at;
};

/** The text chunks (tEXt, zTXt, iTXt) of a PNG, by keyword. Throws when the
 * bytes are not a PNG. */
export async function pngTexts(buffer) {
  const bytes = new Uint8Array(buffer);
  if (!isPng(bytes)) throw new Error('the file is not a PNG');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder('latin1');
  const utf8 = new TextDecoder('utf-8');
  const texts = {};
  let at = 8;
  while (at + 8 <= bytes.length) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, Math.min(bytes.length, at + 8 + length));
    if (type === 'IEND') break;
    const keyEnd = zero(data, 0);
    const key = latin1.decode(data.subarray(0, keyEnd));
    if (type === 'tEXt') {
      texts[key] = latin1.decode(data.subarray(keyEnd + 1));
    } else if (type === 'zTXt') {
      texts[key] = latin1.decode(await inflate(data.subarray(keyEnd + 2)));
    } else if (type === 'iTXt') {
      const compressed = data[keyEnd + 1] === 1;
      const langEnd = zero(data, keyEnd + 3);
      const translatedEnd = zero(data, langEnd + 1);
      const body = data.subarray(translatedEnd + 1);
      texts[key] = utf8.decode(compressed ? await inflate(body) : body);
    }
    at += 12 + length;
  }
  return texts;
}

/** {workflow, params} that a pixart-flow PNG carries; throws with a reason a
 * person can act on when it carries none. */
export async function workflowFromPng(buffer, name = 'the image') {
  const texts = await pngTexts(buffer);
  const workflow = texts[WORKFLOW_KEY];
  if (!workflow) {
    const keys = Object.keys(texts);
    throw new Error(
      `${name} holds no workflow: pixart-flow writes it in a "${WORKFLOW_KEY}" text chunk` +
        (keys.length ? ` (this PNG has only: ${keys.join(', ')})` : ' (this PNG has no text chunks)'),
    );
  }
  let params = {};
  if (texts[PARAMS_KEY]) {
    try {
      const parsed = JSON.parse(texts[PARAMS_KEY]);
      if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) params = parsed;
    } catch {
      /* the workflow alone still restores the graph */
    }
  }
  return { workflow, params };
}
