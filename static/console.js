// vncgate's console page: connects noVNC's RFB client to this port's WebSocket and shows what
// happens in words. The token comes from the fragment (#token=) or the query (?token=); the
// WebSocket always goes to this page's own host and port, whatever else the URL says.
import RFB from './novnc/core/rfb.js';

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.hash.slice(1)).get('token')
    || new URLSearchParams(location.search).get('token') || '';

/** Reconnect delays grow to this, so a long outage costs little. */
const MAX_BACKOFF_MS = 30000;

let rfb = null;
let attempt = 0;
let retryTimer = null;
let countdownTimer = null;
let vmId = '';
// Exposed for tests and for people debugging in the console.
window.vncgate = { state: 'connecting', lastClose: null, rfb: () => rfb };

function setState(state, text) {
  document.body.dataset.state = state;
  window.vncgate.state = state;
  $('status').textContent = text;
  $('btn-cad').disabled = state !== 'connected';
}

function endpoint(path) {
  // Relative to the page, so a reverse proxy that mounts it under a prefix keeps working.
  const url = new URL(path, location.href);
  url.search = `token=${encodeURIComponent(token)}`;
  url.hash = '';
  return url;
}

function websocketUrl() {
  const url = endpoint('websockify');
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

/** Why the daemon refused us, if it did: browsers report a refused upgrade only as 1006. */
async function askSession() {
  try {
    // Our origin goes along: browsers send none on a same-origin GET, and the daemon can then
    // say when it would refuse this page's WebSocket for its Origin.
    const url = endpoint('session');
    url.searchParams.set('origin', location.origin);
    const response = await fetch(url, { cache: 'no-store' });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      return { ok: true, vmId: body.vm_id };
    }
    const code = body.error && body.error.code ? body.error.code : '';
    const message = body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
    if (code === 'token_expired') {
      return { ok: false, final: true, why: 'This console link has expired: ask the platform for a new one' };
    }
    if (code === 'origin_refused') {
      return { ok: false, final: true, why: `This page's origin is refused: ${message}` };
    }
    if (code === 'rate_limited') {
      return { ok: false, why: `Too many wrong tokens from this address: ${message}` };
    }
    if (code === 'forbidden') {
      return { ok: false, final: true, why: `Wrong token: ${message}` };
    }
    if (code === 'not_found') {
      // The public port's answer for a session that was closed (or never was): retrying
      // would only spend this address's failed-token budget.
      return { ok: false, final: true, why: `No such console session: ${message}` };
    }
    return { ok: false, why: message };
  } catch (err) {
    return { ok: false, why: 'vncgate is not reachable' };
  }
}

function describeClose(close) {
  if (!close) {
    return 'Disconnected';
  }
  switch (close.code) {
    case 1000: return close.reason || 'VNC server closed the connection';
    case 1001: return close.reason === 'vncgate restarting' ? 'vncgate is restarting' : (close.reason || 'Going away');
    case 1011: return close.reason || 'VNC server unreachable';
    case 1012: return 'VNC target changed';
    case 1013: return 'Too many viewers on this console';
    case 1008: return close.reason === 'token revoked'
      ? 'This console link was revoked: ask the platform for a new one'
      : (close.reason || 'Disconnected by policy');
    case 1006: return 'Connection lost';
    default: return close.reason || `Disconnected (code ${close.code})`;
  }
}

function scheduleReconnect(why) {
  const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** attempt) * (0.75 + Math.random() / 2);
  attempt += 1;
  const until = Date.now() + delay;
  const tick = () => {
    const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    setState('error', `${why}. Reconnecting in ${left} s…`);
  };
  tick();
  countdownTimer = setInterval(tick, 1000);
  retryTimer = setTimeout(connect, delay);
}

function cancelReconnect() {
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  retryTimer = null;
  countdownTimer = null;
}

async function onDisconnect(close, securityFailure) {
  rfb = null;
  $('credentials').hidden = true;
  window.vncgate.lastClose = close;
  if (close && close.code === 1001 && close.reason === 'session closed') {
    setState('closed', 'Session closed: this console was closed by the VM platform');
    return;
  }
  if (close && close.code === 1008 && close.reason === 'token revoked') {
    setState('closed', describeClose(close));
    return;
  }
  if (securityFailure) {
    setState('error', `The VNC server refused the connection: ${securityFailure}. Press Reconnect to try again`);
    return;
  }
  let why = describeClose(close);
  if (!close || close.code === 1006) {
    const session = await askSession();
    if (!session.ok) {
      if (session.final) {
        // An expired or wrong token will not work on a retry: say so and stop.
        setState('closed', session.why);
        return;
      }
      why = session.why;
    }
  }
  scheduleReconnect(why);
}

function connect() {
  cancelReconnect();
  if (!token) {
    setState('error', 'No token in this URL: open the console link vncgate gave you');
    return;
  }
  setState('connecting', attempt ? `Reconnecting (attempt ${attempt})…` : 'Connecting…');
  // Our own socket, so the close code and reason reach this page (RFB keeps them to itself).
  const ws = new WebSocket(websocketUrl());
  let close = null;
  let securityFailure = null;
  ws.addEventListener('close', (e) => { close = { code: e.code, reason: e.reason }; });
  const client = new RFB($('screen'), ws);
  rfb = client;
  client.scaleViewport = true;
  client.resizeSession = false;
  client.focusOnClick = true;
  client.addEventListener('connect', () => {
    attempt = 0;
    setState('connected', 'Connected');
    client.focus();
  });
  client.addEventListener('disconnect', () => {
    if (rfb === client) {
      onDisconnect(close, securityFailure);
    }
  });
  client.addEventListener('credentialsrequired', (e) => {
    const types = (e.detail && e.detail.types) || ['password'];
    $('username-row').hidden = !types.includes('username');
    $('credentials').hidden = false;
    setState('connecting', 'The VNC server asks for a password');
    (types.includes('username') ? $('username') : $('password')).focus();
  });
  client.addEventListener('securityfailure', (e) => {
    securityFailure = (e.detail && e.detail.reason) || 'authentication failed';
  });
  client.addEventListener('clipboard', (e) => {
    $('clipboard-text').value = e.detail.text;
    if (navigator.clipboard && document.hasFocus()) {
      navigator.clipboard.writeText(e.detail.text).catch(() => {});
    }
  });
  client.addEventListener('desktopname', (e) => {
    // textContent: the name comes from the VNC server and is shown as text, never as markup.
    $('desktop-name').textContent = e.detail.name;
    document.title = `${e.detail.name} · ${vmId || 'vncgate'}`;
  });
}

$('credentials').addEventListener('submit', (e) => {
  e.preventDefault();
  if (rfb) {
    const credentials = { password: $('password').value };
    if (!$('username-row').hidden) {
      credentials.username = $('username').value;
    }
    rfb.sendCredentials(credentials);
  }
  $('password').value = '';
  $('credentials').hidden = true;
  setState('connecting', 'Authenticating…');
});
$('btn-cad').addEventListener('click', () => { if (rfb) { rfb.sendCtrlAltDel(); rfb.focus(); } });
$('btn-fullscreen').addEventListener('click', () => {
  if (document.fullscreenElement) {
    document.exitFullscreen();
  } else {
    document.documentElement.requestFullscreen().catch(() => {});
  }
});
$('btn-reconnect').addEventListener('click', () => {
  attempt = 0;
  if (rfb) {
    const old = rfb;
    rfb = null;
    old.disconnect();
  }
  connect();
});
$('btn-clipboard').addEventListener('click', () => {
  const panel = $('clipboard-panel');
  panel.hidden = !panel.hidden;
  $('btn-clipboard').setAttribute('aria-expanded', String(!panel.hidden));
});
$('clipboard-send').addEventListener('click', () => {
  if (rfb) {
    rfb.clipboardPasteFrom($('clipboard-text').value);
    rfb.focus();
  }
});

// A new token in the fragment is a new console: start over with it.
window.addEventListener('hashchange', () => location.reload());

// Asked first, connected after: a link that cannot work (closed session, expired or wrong
// token) is explained at once and costs its address one failed check, not three.
askSession().then((session) => {
  if (session.ok) {
    vmId = session.vmId;
    $('vm').textContent = vmId;
    document.title = `${vmId} · vncgate`;
  } else if (session.final) {
    setState('closed', session.why);
    return;
  }
  connect();
});
