// Drives Debian's Chromium (headless) through one console session for tests/console_e2e.rs.
// Usage: node console.mjs '<json spec>'; prints one JSON result line.
// Spec: { url, outDir, name, width, height, app: "bundled" | "novnc",
//         action: null | { kind: "type", text, at: [fx, fy] } | { kind: "key", key } }
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const spec = JSON.parse(process.argv[2]);
const deadline = (ms) => Date.now() + ms;
const result = { errors: [], external: [] };

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1024, height: 768 } });
  const origin = new URL(spec.url).host;
  page.on('request', (r) => {
    const u = new URL(r.url());
    if ((u.protocol === 'http:' || u.protocol === 'https:' || u.protocol === 'ws:') && u.host !== origin) {
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

  const before = await settled(notBlank, 'first picture');
  writeFileSync(join(spec.outDir, `${spec.name}-before.rgba`), before);
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
} catch (e) {
  result.errors.push(String(e && e.stack || e));
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
