// The editor in real headless Chromium (Debian's, driven by playwright-core):
// build a small workflow by dragging and connecting, see a type mismatch
// refused, save YAML and have `pixart validate` accept it, run it and see the
// image; load txt2img.yaml, watch the sampler's progress, cancel a long run.
//
// node tests/editor.mjs BASE_URL SCREENSHOT_DIR WORK_DIR PIXART_BINARY

import { chromium } from 'playwright-core';
import YAML from 'yaml';
import { dailyUse } from './daily-use.mjs';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

const [base, shots, work, pixart] = process.argv.slice(2);
if (!pixart) {
  console.error('usage: node tests/editor.mjs BASE_URL SCREENSHOT_DIR WORK_DIR PIXART_BINARY');
  process.exit(2);
}
mkdirSync(shots, { recursive: true });
mkdirSync(work, { recursive: true });

const check = (ok, what) => {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1500, height: 950 }, acceptDownloads: true });
  page = await context.newPage();
  page.on('pageerror', (e) => console.error(`page error: ${e}`));
  const shot = (name) => page.screenshot({ path: join(shots, `${name}.png`) });

  await page.goto(base);
  await page.waitForSelector('.palette-item[data-type="noise.gaussian"]');
  check(await page.locator('[data-testid="empty-hint"]').count() === 1, 'an empty canvas says how to begin');
  check(await page.locator('.palette h3').count() > 3, 'the palette groups the catalog by category');

  // Search narrows the palette.
  await page.fill('.palette .search', 'gaussian');
  check(await page.locator('.palette-item').count() === 1, 'search finds noise.gaussian alone');
  await page.fill('.palette .search', '');

  // Drag three nodes onto the canvas.
  const canvas = page.locator('.react-flow__pane');
  const box = await canvas.boundingBox();
  const drop = async (type, x, y) => {
    await page.locator(`.palette-item[data-type="${type}"]`).dragTo(canvas, { targetPosition: { x, y } });
  };
  await drop('noise.gaussian', 60, 80);
  await drop('image.from_tensor', 420, 80);
  await drop('image.save', 780, 80);
  await page.waitForSelector('[data-node="save"]');
  check(await page.locator('.react-flow__node').count() === 3, 'three nodes were dragged onto the canvas');

  // Literal inputs through their widgets.
  const shape = page.locator('[data-node="gaussian"] input[data-port="shape"]');
  await shape.fill('[1, 64, 64, 3]');
  await shape.blur();
  await page.locator('[data-node="from_tensor"] select[data-port="layout"]').selectOption('nhwc');
  check(
    (await page.locator('[data-node="from_tensor"] select[data-port="range"] option').allTextContents()).join() === 'minus_one_one,zero_one',
    'an enum input offers exactly its choices',
  );
  await page.locator('[data-node="save"] input[data-port="path"]').fill('editor-noise.png');
  const seed = page.locator('[data-node="gaussian"] input[data-port="seed"]');
  check((await seed.getAttribute('min')) === '0', 'a number widget carries the declared minimum');

  // Validate as you edit: an out-of-range seed marks the node and the port.
  await seed.fill('-3');
  await page.waitForSelector('[data-node="gaussian"].has-error .port.port-error');
  const finding = await page.textContent('.findings li.error');
  check(/gaussian\.seed/.test(finding) && /-3/.test(finding), `the server's finding is shown on node and port: "${finding}"`);
  await shot('0-invalid-seed');
  await seed.fill('0');
  await page.waitForSelector('[data-node="gaussian"]:not(.has-error)');

  const handle = (node, port, kind) =>
    page.locator(`.react-flow__node[data-id="${node}"] .react-flow__handle.${kind}[data-handleid="${port}"]`);
  const connect = async (from, out, to, input) => {
    const a = await handle(from, out, 'source').boundingBox();
    const b = await handle(to, input, 'target').boundingBox();
    await page.mouse.move(a.x + a.width / 2, a.y + a.height / 2);
    await page.mouse.down();
    await page.mouse.move((a.x + b.x) / 2, (a.y + b.y) / 2, { steps: 5 });
    await page.mouse.move(b.x + b.width / 2, b.y + b.height / 2, { steps: 5 });
    await page.mouse.up();
  };

  // A Tensor into an Image input is refused on the spot, with the reason.
  await connect('gaussian', 'tensor', 'save', 'image');
  await page.waitForSelector('[data-testid="toast"]');
  const toast = await page.textContent('[data-testid="toast"]');
  check(/Refused: save\.image takes Image, gaussian\.tensor gives Tensor/.test(toast), `type mismatch refused: "${toast}"`);
  check(await page.locator('.react-flow__edge').count() === 0, 'no edge was made');
  await shot('1-mismatch-refused');

  await connect('gaussian', 'tensor', 'from_tensor', 'tensor');
  await connect('from_tensor', 'image', 'save', 'image');
  await page.waitForFunction(() => document.querySelectorAll('.react-flow__edge').length === 2);
  await page.waitForFunction(() => document.querySelector('[data-testid="validity"]').textContent === 'valid');
  check(true, 'two typed connections made; the server validates the graph');
  await shot('2-built');

  // Save YAML; the CLI accepts what the editor saved.
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('text=Save YAML')]);
  const saved = join(work, 'editor-saved.yaml');
  await download.saveAs(saved);
  const yaml = readFileSync(saved, 'utf8');
  check(yaml.includes('gaussian:') && yaml.includes('${gaussian.tensor}') && yaml.includes('ui:'), 'saved YAML has ids, edges and layout');
  const validated = execFileSync(pixart, ['validate', saved], { encoding: 'utf8' });
  check(/ok \(3 nodes, 2 edges\)/.test(validated), `pixart validate accepts it: ${validated.trim()}`);

  // Run it and see the image.
  await page.click('button:has-text("Run")');
  await page.waitForSelector('[data-node="save"][data-state="done"]', { timeout: 60000 });
  await page.waitForSelector('[data-node="save"] img.output-image');
  await page.waitForFunction(() => {
    const img = document.querySelector('[data-node="save"] img.output-image');
    return img && img.complete && img.naturalWidth === 64;
  });
  check(true, 'the run finished and its 64×64 image is shown on the save node');
  await shot('3-ran');

  // Again: the unchanged upstream nodes come from the server's cache.
  await page.click('button:has-text("Run")');
  await page.waitForSelector('[data-node="gaussian"][data-state="cached"]', { timeout: 30000 });
  await page.waitForSelector('[data-node="save"][data-state="done"]', { timeout: 30000 });
  check(true, 'a second run shows cached nodes');

  // A failing node shows its message: a path that leaves the server's folders.
  await page.locator('[data-node="save"] input[data-port="path"]').fill('../outside.png');
  await page.click('button:has-text("Run")');
  await page.waitForSelector('[data-node="save"][data-state="failed"]', { timeout: 30000 });
  const failure = await page.textContent('[data-node="save"] .run-state .finding');
  check(/\.\./.test(failure), `the failed node shows why: "${failure}"`);
  await page.locator('[data-node="save"] input[data-port="path"]').fill('editor-noise.png');
  await shot('3b-failed');

  // Drag-and-drop loading, and the round trip: what was saved loads back as it was.
  const dropped = await page.evaluateHandle((text) => {
    const dt = new DataTransfer();
    dt.items.add(new File([text], 'editor-saved.yaml', { type: 'application/yaml' }));
    return dt;
  }, yaml);
  await page.dispatchEvent('.canvas', 'drop', { dataTransfer: dropped });
  await page.waitForFunction(() => /Loaded editor-saved\.yaml/.test(document.querySelector('[data-testid="toast"]')?.textContent || ''));
  const [again] = await Promise.all([page.waitForEvent('download'), page.click('text=Save YAML')]);
  const resaved = join(work, 'editor-resaved.yaml');
  await again.saveAs(resaved);
  const a = YAML.parse(yaml);
  const b = YAML.parse(readFileSync(resaved, 'utf8'));
  check(JSON.stringify(a.nodes) === JSON.stringify(b.nodes), 'a dropped file saves back with the same nodes and inputs');
  check(JSON.stringify(a.ui.nodes) === JSON.stringify(b.ui.nodes), 'and the same layout');

  // A real pipeline: load txt2img.yaml with the file picker, watch progress.
  const txt2img = resolve('..', 'workflows', 'txt2img.yaml');
  await page.setInputFiles('[data-testid="load-file"]', txt2img);
  await page.waitForSelector('[data-node="sample"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="validity"]').textContent === 'valid');
  const [t2i] = await Promise.all([page.waitForEvent('download'), page.click('text=Save YAML')]);
  const t2iSaved = join(work, 'txt2img-saved.yaml');
  await t2i.saveAs(t2iSaved);
  const original = YAML.parse(readFileSync(txt2img, 'utf8'));
  const roundTrip = YAML.parse(readFileSync(t2iSaved, 'utf8'));
  check(
    JSON.stringify(original.params) === JSON.stringify(roundTrip.params)
      && JSON.stringify(original.nodes) === JSON.stringify(roundTrip.nodes)
      && original.name === roundTrip.name,
    'txt2img.yaml round-trips: name, params, node ids and inputs unchanged (plus a ui: block)',
  );
  check(/ok \(6 nodes/.test(execFileSync(pixart, ['validate', t2iSaved], { encoding: 'utf8' })), 'and pixart validate accepts it');
  await page.evaluate(() => {
    window.sawProgress = new Set();
    window.sawPreview = new Set();
    new MutationObserver(() => {
      for (const p of document.querySelectorAll('.react-flow__node progress')) {
        window.sawProgress.add(p.closest('[data-node]').dataset.node);
      }
      for (const img of document.querySelectorAll('.react-flow__node img.preview')) {
        if (img.src.startsWith('data:image/png;base64,')) window.sawPreview.add(img.alt);
      }
    }).observe(document.body, { subtree: true, childList: true, attributes: true });
  });
  await page.click('button:has-text("Run")');
  await page.waitForSelector('[data-node="save"][data-state="done"]', { timeout: 120000 });
  await page.waitForSelector('[data-node="save"] img.output-image');
  const progressed = await page.evaluate(() => [...window.sawProgress]);
  check(progressed.includes('sample'), `the sampler showed a progress bar (${progressed.join(', ')})`);
  const previews = await page.evaluate(() => [...window.sawPreview]);
  check(previews.some((p) => p.startsWith('sample preview')), `the sampler sent preview images (${previews.join('; ')})`);
  await page.click('[data-tab="gallery"]');
  await page.waitForSelector('.side .gallery-item img.side-image');
  check(await page.locator('.side img.side-image').count() >= 1, 'the output image is listed in the gallery');
  await shot('4-txt2img');

  // Cancel a long run (steps and seed set in the params panel).
  await page.click('[data-tab="params"]');
  await page.fill('[data-param="steps"]', '1000');
  await page.fill('[data-param="seed"]', '7');
  await page.waitForFunction(() => document.querySelector('[data-testid="validity"]').textContent === 'valid');
  await page.click('button:has-text("Run")');
  await page.waitForSelector('[data-node="sample"] progress', { timeout: 60000 });
  await page.click('button:has-text("Cancel")');
  await page.waitForFunction(() => /cancelled/.test(document.querySelector('[data-testid="run-status"]').textContent), null, { timeout: 30000 });
  check(true, 'a long run was cancelled from the editor');
  await shot('5-cancelled');

  // The PixArt family's nodes and every sampler are in the catalog and the widgets.
  for (const type of ['image.resize', 'mask.from_image', 'scheduler.select']) {
    check(await page.locator(`.palette-item[data-type="${type}"]`).count() === 1, `the palette offers ${type}`);
  }
  await drop('scheduler.select', 40, 40);
  await page.waitForSelector('[data-node="select"]');
  const samplers = await page.locator('[data-node="select"] select[data-port="name"] option').allTextContents();
  check(
    ['dpm_solver++', 'ddim', 'iddpm', 'lcm', 'sa_solver', 'dmd'].every((s) => samplers.includes(s)),
    `scheduler.select offers every sampler (${samplers.join(', ')})`,
  );
  await shot('6-samplers');

  await dailyUse(page, shot, { txt2img, work, pixart, drop, check });
  writeFileSync(join(shots, 'done.txt'), 'ok\n');
} catch (e) {
  if (page) await page.screenshot({ path: join(shots, 'failure.png') }).catch(() => {});
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
