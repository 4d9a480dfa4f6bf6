// Drives Debian's Chromium (headless) through one console session for tests/console_e2e.rs.
// Usage: node console.mjs '<json spec>'; prints one JSON result line.
// Spec: { url, outDir, name, width, height, app: "bundled" | "novnc", capture: true, spki: [],
//         action: null | { kind: "type", text, at: [fx, fy] } | { kind: "key", key },
//         display, api, steps: [ { op, ... } ] }  (steps: see runStep below)
import { execFile, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const spec = JSON.parse(process.argv[2]);
const deadline = (ms) => Date.now() + ms;
const result = { errors: [], external: [] };

// spki: base64 SHA-256 hashes of the test CA's leaf keys: Chromium trusts exactly those
// certificates (not every certificate, as --ignore-certificate-errors would).
const tlsArgs = spec.spki ? [`--ignore-certificate-errors-spki-list=${spec.spki.join(',')}`] : [];
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', ...tlsArgs],
});
try {
  const page = await browser.newPage({ viewport: { width: 1024, height: 768 } });
  const origin = new URL(spec.url).host;
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (['http:', 'https:', 'ws:', 'wss:'].includes(u.protocol) && u.host !== origin) {
      result.external.push(r.url());
    }
  });
  page.on('pageerror', (e) => result.errors.push(String(e)));
  await page.goto(spec.url);

  // The framebuffer canvas: the one whose bitmap has the VNC screen's size.
  const grab = () => page.evaluate(([w, h]) => {
    const canvas = [...document.querySelectorAll('canvas')].find((c) => c.width === w && c.height === h);
    if (!canvas) return null;
    const data = canvas.getContext('2d').getImageData(0, 0, w, h).data;
    let s = '';
    for (let i = 0; i < data.length; i += 0x8000) {
      s += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
    }
    return btoa(s);
  }, [spec.width, spec.height]);
  const differing = (a, b) => {
    let n = 0;
    for (let i = 0; i < a.length; i += 4) {
      if (a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2]) n++;
    }
    return n;
  };
  // Waits until the canvas holds a picture that `accept` likes and that two reads agree on.
  const settled = async (accept, what) => {
    const until = deadline(30000);
    let last = null;
    for (;;) {
      const b64 = await grab();
      const px = b64 ? Buffer.from(b64, 'base64') : null;
      if (px && accept(px) && last && differing(last, px) <= (spec.width * spec.height) / 1000) {
        return px;
      }
      last = px;
      if (Date.now() > until) throw new Error(`canvas did not settle: ${what}`);
      await page.waitForTimeout(200);
    }
  };
  const notBlank = (px) => { for (let i = 0; i < px.length; i += 4) if (px[i] || px[i + 1] || px[i + 2]) return true; return false; };

  const before = spec.capture === false ? null : await settled(notBlank, 'first picture');
  if (before) writeFileSync(join(spec.outDir, `${spec.name}-before.rgba`), before);
  await page.screenshot({ path: join(spec.outDir, `${spec.name}-before.png`) });
  if (spec.app === 'bundled') {
    result.state = await page.evaluate(() => window.vncgate.state);
    result.status = await page.textContent('#status');
    result.vm = await page.textContent('#vm');
    result.desktopName = await page.textContent('#desktop-name');
    result.desktopNameElements = await page.evaluate(() => document.getElementById('desktop-name').childElementCount);
  }

  if (spec.action) {
    const canvas = await page.evaluate(([w, h]) => {
      const c = [...document.querySelectorAll('canvas')].find((c) => c.width === w && c.height === h);
      const r = c.getBoundingClientRect();
      return { x: r.x, y: r.y, w: r.width, h: r.height };
    }, [spec.width, spec.height]);
    if (spec.action.kind === 'type') {
      const [fx, fy] = spec.action.at;
      await page.mouse.move(canvas.x + fx * canvas.w, canvas.y + fy * canvas.h);
      await page.keyboard.type(spec.action.text, { delay: 20 });
      await page.keyboard.press('Enter');
    } else {
      await page.keyboard.press(spec.action.key);
    }
    const after = await settled((px) => differing(before, px) > 50, 'change after the input');
    writeFileSync(join(spec.outDir, `${spec.name}-after.rgba`), after);
    await page.screenshot({ path: join(spec.outDir, `${spec.name}-after.png`) });
  }

  // Scripted steps, each bounded; the first failure ends the run with an error.
  const children = [];
  const waitFor = async (what, check) => {
    const until = deadline(20000);
    // A check may run into a navigation (the page reloads on a new token): that is a "not yet".
    while (!(await check().catch(() => false))) {
      if (Date.now() > until) {
        throw new Error(`step timed out: ${what}; status: ${await page.textContent('#status').catch(() => '?')}`);
      }
      await page.waitForTimeout(100);
    }
  };
  const runStep = async (step) => {
    switch (step.op) {
      case 'goto': return page.goto(step.url);
      case 'gotoSession': {
        // The session's current url (its token may have been rotated by an earlier step).
        const r = await fetch(`${spec.api}/v1/sessions/${step.vm_id}`);
        if (r.status !== 200) throw new Error(`GET /v1/sessions/${step.vm_id}: HTTP ${r.status}`);
        return page.goto((await r.json()).url);
      }
      case 'waitState': return waitFor(`state ${step.state}`, () => page.evaluate((s) => window.vncgate && window.vncgate.state === s, step.state));
      case 'waitStatus': return waitFor(`status ~ ${step.contains}`, async () => ((await page.textContent('#status')) || '').includes(step.contains));
      case 'waitVisible': return page.waitForSelector(step.selector, { state: 'visible', timeout: 20000 });
      case 'waitValue': return waitFor(`${step.selector} = ${step.equals}`, async () => (await page.inputValue(step.selector)) === step.equals);
      case 'fill': return page.fill(step.selector, step.value);
      case 'click': return page.click(step.selector);
      case 'spawn': {
        // A helper on the VM's display (xclip); killed when the driver ends.
        const child = spawn(step.cmd, step.args, { env: { ...process.env, DISPLAY: spec.display }, stdio: ['pipe', 'ignore', 'ignore'] });
        child.stdin.end(step.stdin || '');
        children.push(child);
        return null;
      }
      case 'waitExec': {
        // Polls a command on the VM's display until it prints `expect` (e.g. xclip -o).
        const run = () => new Promise((resolve) => {
          execFile(step.cmd, step.args, { env: { ...process.env, DISPLAY: spec.display }, timeout: 3000 },
            (err, stdout) => resolve(err ? null : stdout));
        });
        return waitFor(`${step.cmd} prints ${step.expect}`, async () => (await run()) === step.expect);
      }
      case 'api': {
        const r = await fetch(spec.api + step.path, { method: step.method, body: step.body ? JSON.stringify(step.body) : undefined });
        if (r.status !== step.status) throw new Error(`${step.method} ${step.path}: HTTP ${r.status}`);
        return null;
      }
      case 'touch': {
        // Tells the Rust side to act (e.g. restart the daemon) at this point of the script.
        writeFileSync(step.path, 'now');
        return null;
      }
      case 'record': {
        result[step.as] = await page.textContent(step.selector);
        return null;
      }
      default: throw new Error(`unknown step ${step.op}`);
    }
  };
  try {
    for (const [i, step] of (spec.steps || []).entries()) {
      await runStep(step);
      result.stepsDone = i + 1;
    }
    if (spec.steps) await page.screenshot({ path: join(spec.outDir, `${spec.name}-steps.png`) });
  } finally {
    for (const c of children) c.kill();
  }
} catch (e) {
  result.errors.push(String(e && e.stack || e));
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
