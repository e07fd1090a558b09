// The editor for daily use, as a user does it (issue 23): the params panel,
// outputs that never overwrite, restoring from a PNG, undo, copy and paste,
// autosave across a reload, the queue (reorder, pause, cancel) and the gallery,
// keys, double-click search, upload, toasts, tooltips, findings on the loaded
// file's lines. Called by editor.mjs with its page.

import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { deflateSync } from 'node:zlib';
import { mapFindings, toYaml, fromYaml } from '../src/workflow.js';
import { pngTexts } from '../src/png.js';

const sha = (bytes) => createHash('sha256').update(bytes).digest('hex');

/** A 1×1 PNG with no text chunks (not made by pixart-flow). */
function plainPng() {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, 'latin1');
    data.copy(out, 8);
    out.writeUInt32BE(crc(out.subarray(4, 8 + data.length)), 8 + data.length);
    return out;
  };
  const ihdr = Buffer.from([0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0]);
  const idat = deflateSync(Buffer.from([0, 255, 0, 0]));
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr), chunk('IDAT', idat), chunk('IEND', Buffer.alloc(0))]);
}

export async function dailyUse(page, shot, { txt2img, work, check }) {
  const status = () => page.textContent('[data-testid="run-status"]');
  const valid = () => page.waitForFunction(() => document.querySelector('[data-testid="validity"]').textContent === 'valid');
  const api = (path) => page.evaluate(async (p) => (await fetch(p)).json(), path);
  const fileBytes = async (id) =>
    Buffer.from(await page.evaluate(async (i) => Array.from(new Uint8Array(await (await fetch(`api/files/${i}`)).arrayBuffer())), id));
  const toast = (re) =>
    page.waitForFunction((src) => [...document.querySelectorAll('[data-testid="toast"]')].some((t) => new RegExp(src).test(t.textContent)), re.source);
  /** Triggers a run and waits until the canvas shows it finished; its id. */
  const runAndWait = async (trigger) => {
    const before = await status();
    await trigger();
    await page.waitForFunction(
      (prev) => {
        const text = document.querySelector('[data-testid="run-status"]').textContent;
        return text !== prev && /: (done|failed)$/.test(text);
      },
      before,
      { timeout: 120000 },
    );
    const text = await status();
    check(/: done$/.test(text), `the run finished: ${text}`);
    return text.match(/^run (\S+):/)[1];
  };
  const recordOf = async (id) => (await api('api/history')).find((r) => r.id === id);
  const dropFile = async (bytes, name, type) => {
    const dt = await page.evaluateHandle(
      ([b, n, t]) => {
        const d = new DataTransfer();
        d.items.add(new File([new Uint8Array(b)], n, { type: t }));
        return d;
      },
      [Array.from(bytes), name, type],
    );
    await page.dispatchEvent('.canvas', 'drop', { dataTransfer: dt });
  };
  const blur = () => page.click('.react-flow__pane', { position: { x: 5, y: 5 } });
  /** A screenshot for the README: messages dismissed first. */
  const cleanShot = async (name) => {
    await page.evaluate(() => document.querySelectorAll('[data-testid="toast"]').forEach((t) => t.click()));
    await page.waitForFunction(() => document.querySelectorAll('[data-testid="toast"]').length === 0);
    await shot(name);
  };

  // Findings are mapped by what they point at, back to the loaded file's lines.
  {
    const original = '# a comment\n# another\nversion: 1\nnodes:\n  a:\n    type: noise.gaussian\n    inputs: {seed: -1}\n';
    const graph = fromYaml(original);
    const sent = `# new first line\n${toYaml(original, graph.nodes.map((n) => ({ ...n, position: { x: 0, y: 0 } })), graph.edges)}`;
    const sentLine = sent.split('\n').findIndex((l) => l.includes('seed: -1')) + 1;
    const [byPort, byLine] = mapFindings(
      [
        { severity: 'error', node: 'a', port: 'seed', line: sentLine, message: 'below 0' },
        { severity: 'error', line: sentLine, message: 'no node named' },
      ],
      sent,
      original,
    );
    check(byPort.line === 7 && byLine.line === 7, `findings on the sent text map back to line 7 of the loaded file (${byPort.line}, ${byLine.line})`);
    check(toYaml(original, graph.nodes.map((n) => ({ ...n, position: { x: 0, y: 0 } })), graph.edges).startsWith('# a comment\n# another\n'), 'saving keeps the file’s comments');
  }

  // ---- 1. the params panel ---------------------------------------------------------
  await page.setInputFiles('[data-testid="load-file"]', txt2img);
  await page.waitForSelector('[data-node="pos"] [data-param-ref="prompt"]');
  check(await page.locator('[data-node="pos"] input[data-port="text"]').count() === 0, 'the prompt input shows its param reference, not a text field to type over it');
  const tip = await page.getAttribute('[data-node="sample"] .port.in:has([data-handleid="steps"])', 'title');
  check(/steps: Int/.test(tip) && /default: 20/.test(tip), `a port's tooltip comes from its declaration: ${JSON.stringify(tip)}`);
  await page.click('[data-tab="params"]');
  const prompt = page.locator('textarea[data-param="prompt"]');
  check(await prompt.count() === 1, 'the prompt is a multi-line field in the params panel');
  const firstPrompt = 'a small green triangle on the right\non a black background';
  await prompt.fill(firstPrompt);
  // An invalid run is refused with the reason, not just "refused".
  await page.fill('[data-param="steps"]', '5000');
  await page.waitForFunction(() => document.querySelector('[data-testid="validity"]').textContent === '1 error');
  await page.click('button:has-text("Run")');
  await toast(/Not queued: 1 error in the workflow\. line 19: param `steps` = 5000: 5000 is above the maximum 1000/);
  check(true, 'a run with an out-of-range param is refused with the param and the reason');
  await page.fill('[data-param="steps"]', '2');
  await page.fill('[data-param="seed"]', '5');
  await valid();
  check(!/never used/.test(await page.textContent('.findings-box')), 'no "param is never used" warning: the reference stayed');
  await cleanShot('params');
  // Ctrl+Enter runs from anywhere, even inside the prompt field.
  await prompt.focus();
  const first = await runAndWait(() => page.keyboard.press('Control+Enter'));
  const firstRecord = await recordOf(first);
  check(firstRecord?.params?.prompt === firstPrompt && firstRecord.params.seed === 5, 'the run got the typed prompt and seed as params');
  check(typeof firstRecord.workflow === 'string' && firstRecord.workflow.includes('${params.prompt}'), 'the run’s workflow still refers to the param');
  check(firstRecord.finished_at >= firstRecord.started_at && firstRecord.started_at >= firstRecord.submitted_at, 'the history record is timed');
  const firstFile = firstRecord.outputs.flatMap((o) => o.files)[0];
  check(/txt2img-5\.png$/.test(firstFile.path), `the seed reached the file name: ${firstFile.path}`);
  const firstBytes = await fileBytes(firstFile.id);
  const texts = await pngTexts(firstBytes);
  check(JSON.parse(texts['pixart-params']).prompt === firstPrompt, 'the PNG records the typed prompt');

  // ---- 2. a second run never overwrites the first ----------------------------------
  const secondPrompt = 'a large red circle at the top on a white background';
  await prompt.fill(secondPrompt);
  await valid();
  const second = await runAndWait(() => page.click('button:has-text("Run")'));
  const secondFile = (await recordOf(second)).outputs.flatMap((o) => o.files)[0];
  check(secondFile.id !== firstFile.id && secondFile.path !== firstFile.path, `the same seed writes a new file: ${secondFile.path}`);
  check(sha(await fileBytes(firstFile.id)) === sha(firstBytes), 'the first run’s file id still serves the bytes it was made with');
  await page.click('[data-tab="gallery"]');
  await page.waitForSelector(`.gallery-item[data-run="${second}"] img[data-file="${secondFile.id}"]`);
  await page.waitForSelector(`.gallery-item[data-run="${first}"] img[data-file="${firstFile.id}"]`);
  await page.waitForFunction(() => [...document.querySelectorAll('.gallery-item img')].slice(0, 2).every((i) => i.complete && i.naturalWidth === 64));
  const captions = await page.locator('.gallery-item .gallery-prompt').allTextContents();
  check(captions[0] === secondPrompt && captions[1] === firstPrompt, `the gallery shows both runs, newest first, with their prompts (${JSON.stringify(captions.slice(0, 2))})`);
  await cleanShot('gallery');

  // "Open in the editor" brings a run's workflow and params back.
  await page.click(`.gallery-item[data-run="${first}"] .open-run`);
  await page.waitForFunction((p) => document.querySelector('textarea[data-param="prompt"]')?.value === p, firstPrompt);
  check(true, 'a gallery entry opens its run’s workflow and params');

  // ---- 3. dropping a PNG brings its graph back ----------------------------------------
  await page.setInputFiles('[data-testid="load-file"]', join(work, 'editor-saved.yaml'));
  await page.waitForSelector('[data-node="gaussian"]');
  check(await page.locator('[data-node="sample"]').count() === 0, 'another workflow is on the canvas');
  await dropFile(await fileBytes(secondFile.id), 'txt2img-from-gallery.png', 'image/png');
  await page.waitForSelector('[data-node="sample"]');
  await toast(/Restored the workflow of txt2img-from-gallery\.png/);
  await page.click('[data-tab="params"]');
  check((await prompt.inputValue()) === secondPrompt, 'the dropped PNG restored the graph and its params');
  // The file picker takes PNGs too.
  await page.setInputFiles('[data-testid="load-file"]', join(work, 'editor-saved.yaml'));
  await page.waitForSelector('[data-node="gaussian"]');
  await page.setInputFiles('[data-testid="load-file"]', { name: 'picked.png', mimeType: 'image/png', buffer: await fileBytes(firstFile.id) });
  await toast(/Restored the workflow of picked\.png/);
  await page.waitForFunction((p) => document.querySelector('textarea[data-param="prompt"]')?.value === p, firstPrompt);
  check(true, 'Load… restores a PNG’s workflow and params too');
  await dropFile(plainPng(), 'plain.png', 'image/png');
  await toast(/plain\.png holds no workflow/);
  check(true, 'a PNG without a workflow is refused in words');
  await dropFile(Buffer.from('version: 1\nnodes: {a: [1, 2\n'), 'notes.yaml', 'application/yaml');
  await toast(/Cannot load notes\.yaml: it is not valid YAML/);
  check(true, 'a broken file is refused in words');

  // ---- 4. undo, redo, copy and paste ------------------------------------------------
  const count = () => page.locator('.react-flow__node').count();
  const edgesNow = () => page.locator('.react-flow__edge').count();
  const nodes0 = await count();
  const edges0 = await edgesNow();
  await page.click('[data-node="neg"] header');
  await page.keyboard.press('Delete');
  await page.waitForFunction((n) => document.querySelectorAll('.react-flow__node').length === n - 1, nodes0);
  check((await edgesNow()) === edges0 - 3, 'deleting a node removed its edges');
  await page.waitForTimeout(500);
  await page.keyboard.press('Control+z');
  await page.waitForSelector('[data-node="neg"]');
  await page.waitForFunction((n) => document.querySelectorAll('.react-flow__edge').length === n, edges0);
  check(true, 'Ctrl+Z brought the deleted node back with its edges');
  await page.keyboard.press('Control+Shift+z');
  await page.waitForFunction(() => !document.querySelector('[data-node="neg"]'));
  await page.click('button[aria-label="undo"]');
  await page.waitForSelector('[data-node="neg"]');
  check(true, 'redo deletes it again, and the undo button restores it');
  await page.click('[data-node="neg"] header');
  await page.keyboard.press('Control+c');
  await page.keyboard.press('Control+Shift+v');
  await page.waitForSelector('[data-node="encode"]');
  await page.waitForFunction(() => [...document.querySelectorAll('.react-flow__edge')].filter((e) => e.dataset.testid?.includes('->encode.')).length === 2);
  check((await count()) === nodes0 + 1, 'Ctrl+C, Ctrl+Shift+V pasted the node with a fresh id and its two input edges');
  await page.waitForTimeout(500);
  await blur();
  await page.keyboard.press('Control+z');
  await page.waitForFunction(() => !document.querySelector('[data-node="encode"]'));
  check(true, 'and undo takes the paste back');

  // ---- findings on the loaded file's lines, after an edit moved the rest ----------------
  const lines = [
    '# Two noise nodes; the second has a seed below its minimum.', // 1
    'version: 1', // 2
    'nodes:', // 3
    '  a:', // 4
    '    type: noise.gaussian', // 5
    '    inputs:', // 6
    '      shape: [1, 4, 8, 8]', // 7
    '  b:', // 8
    '    type: noise.gaussian', // 9
    '    inputs: {shape: [1, 4, 8, 8], seed: -1}', // 10
    '',
  ];
  writeFileSync(join(work, 'mapped.yaml'), lines.join('\n'));
  await page.setInputFiles('[data-testid="load-file"]', join(work, 'mapped.yaml'));
  await page.waitForSelector('[data-node="b"]');
  await page.waitForFunction(() => /^line 10: b\.seed/.test(document.querySelector('.findings li.error')?.textContent || ''));
  // A seed typed on `a` adds a line to its block of inputs: the text validated
  // now has b's seed on line 11; the finding still names line 10 of the file.
  await page.fill('[data-node="a"] input[data-port="seed"]', '3');
  await page.waitForTimeout(800);
  const mapped = await page.textContent('.findings li.error');
  check(/^line 10: b\.seed/.test(mapped), `a finding names its line in the loaded file after an edit moved it in the text sent: "${mapped}"`);
  await page.click('[data-tab="gallery"]');
  await page.click(`.gallery-item[data-run="${second}"] .open-run`);
  await page.waitForSelector('[data-node="sample"]');
  await page.click('[data-tab="params"]');

  // ---- 5. the canvas survives a reload ---------------------------------------------------
  await page.fill('[data-param="seed"]', '11');
  await page.waitForTimeout(800);
  await page.reload();
  await page.waitForSelector('[data-node="sample"]');
  await page.click('[data-tab="params"]');
  check((await page.inputValue('textarea[data-param="prompt"]')) === secondPrompt && (await page.inputValue('[data-param="seed"]')) === '11', 'after a reload the canvas and the params are back');

  // ---- double-click search, no stacked nodes, upload, a node a run does not need -----
  const pane = await page.locator('.react-flow__pane').boundingBox();
  await page.mouse.dblclick(pane.x + 120, pane.y + pane.height - 120);
  await page.waitForSelector('[data-testid="quick-add"] input');
  await page.keyboard.type('image.load');
  await page.keyboard.press('Enter');
  await page.waitForSelector('[data-node="load"]');
  check(true, 'double-clicking the canvas opens a search that adds the node where it was asked');
  await page.dblclick('.palette-item[data-type="text.save"]');
  await page.dblclick('.palette-item[data-type="text.save"]');
  await page.waitForSelector('[data-node="save_2"]');
  const a = await page.locator('[data-node="save_2"]').boundingBox();
  const b = await page.locator('[data-node="save_3"]').boundingBox();
  check(Math.abs(a.x - b.x) > 20 || Math.abs(a.y - b.y) > 20, 'nodes added from the palette do not land on each other');
  for (const id of ['save_2', 'save_3']) {
    await page.click(`[data-node="${id}"] header`);
    await page.keyboard.press('Delete');
  }
  await page.setInputFiles('[data-upload="load.path"]', { name: 'upload-me.png', mimeType: 'image/png', buffer: plainPng() });
  await page.waitForFunction(() => /upload/.test(document.querySelector('[data-node="load"] input[data-port="path"]')?.value || ''));
  check(true, `the upload button stored the image and set the path (${await page.inputValue('[data-node="load"] input[data-port="path"]')})`);
  await valid();

  // ---- 6. the queue: three runs, reorder, pause, cancel the second --------------------------
  await page.click('[data-tab="queue"]');
  await page.click('[data-testid="queue-pause"]');
  await page.waitForFunction(() => /Resume/.test(document.querySelector('[data-testid="queue-pause"]').textContent));
  for (let i = 0; i < 3; i++) {
    await page.click('button:has-text("Run")');
    await page.waitForFunction((n) => document.querySelectorAll('.queue-item[data-state="queued"]').length === n, i + 1);
  }
  const queued = await page.locator('.queue-item').evaluateAll((items) => items.map((i) => i.dataset.run));
  check(queued.length === 3, `three runs wait in the queue (${queued.join(', ')})`);
  // The third to the front, then stop the second.
  await page.click(`button[aria-label="move ${queued[2]} up"]`);
  await page.waitForFunction((id) => document.querySelectorAll('.queue-item')[1]?.dataset.run === id, queued[2]);
  await page.click(`button[aria-label="move ${queued[2]} up"]`);
  await page.waitForFunction((id) => document.querySelectorAll('.queue-item')[0]?.dataset.run === id, queued[2]);
  check(true, 'the third run moved to the front');
  await cleanShot('queue');
  await page.click(`button[aria-label="stop ${queued[1]}"]`);
  await page.waitForFunction((id) => !document.querySelector(`.queue-item[data-run="${id}"]`), queued[1]);
  await page.click('[data-testid="queue-pause"]');
  await page.waitForFunction(() => document.querySelectorAll('.queue-item').length === 0, null, { timeout: 120000 });
  const history = await api('api/history');
  const state = (id) => history.find((r) => r.id === id);
  check(state(queued[1])?.state === 'cancelled', 'the second run was cancelled before it started');
  check(state(queued[0])?.state === 'finished' && state(queued[2])?.state === 'finished', 'the other two finished');
  check(state(queued[2]).started_at <= state(queued[0]).started_at, 'in the new order: the third started first');
  await page.waitForFunction(() => document.querySelector('[data-node="load"]')?.dataset.state === 'unused');
  check(true, 'a node the run does not need says so');

  // Toasts go away by themselves.
  await page.waitForFunction(() => document.querySelectorAll('[data-testid="toast"]').length === 0, null, { timeout: 15000 });
  check(true, 'toasts dismiss themselves');

  // Ctrl+S saves; the saved file keeps the workflow's comments.
  await blur();
  const [download] = await Promise.all([page.waitForEvent('download'), page.keyboard.press('Control+s')]);
  const saved = join(work, 'ctrl-s.yaml');
  await download.saveAs(saved);
  const text = readFileSync(saved, 'utf8');
  check(text.startsWith('# Text to image with PixArt-α') && text.includes('# sets the latent size'), 'Ctrl+S saved the workflow with its comments');
  writeFileSync(join(work, 'daily-use.ok'), 'ok\n');
}
