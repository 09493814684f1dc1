"""The MLflow UI as a user sees it, opened by a headless Chromium (for checks and screenshots).

Chromium is driven over the DevTools protocol (a websocket; aiohttp comes with ray[default]),
not with ``--screenshot``, so that the capture waits until the page really shows the run
(its text is read back, which is what tests check) and a side panel can be closed first.
The flags keep Chromium from reaching out to the network (updates, sync, QUIC probes),
which on a closed machine otherwise stalls it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from training.errors import WsssError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)  # fmt: skip

# MLflow 3 opens its "Assistant" chat panel on a first visit, over a third of the page; a
# user closes it once (the choice is remembered), so the picture is taken without it.
CLOSE_ASSISTANT_JS = """
(() => {
  const panel = [...document.querySelectorAll('*')].find(
    e => e.children.length < 40 && /^MLflow Assistant/.test(e.innerText || '') && e.querySelector('button'));
  if (!panel) return false;
  const buttons = [...panel.querySelectorAll('button')];
  const close = buttons.find(b => /close/i.test(b.getAttribute('aria-label') || '')) || buttons[buttons.length - 1];
  close.click();
  return true;
})()
"""


# Click the first button or link whose text is exactly the one given (e.g. "Show more" under a
# description); only one, since a second click on a toggle would close it again.
CLICK_TEXT_JS = """
(() => {
  const hit = [...document.querySelectorAll('button, a')].find(e => (e.innerText || '').trim() === %s);
  if (hit) hit.click();
  return Boolean(hit);
})()
"""


class BrowserError(WsssError):
    """No browser, or the page never showed what was expected."""


@dataclass
class PageCapture:
    """What the browser showed: the picture and the page's visible text."""

    png: Path
    text: str
    url: str


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def capture(
    url: str,
    out: Path,
    *,
    expect: tuple[str, ...] = (),
    click: tuple[str, ...] = (),
    size: tuple[int, int] = (1400, 1300),
    timeout: float = 90.0,
) -> PageCapture:
    """Open ``url`` headless, wait until its text holds every string of ``expect``, save a PNG.

    Args:
        url: the page (e.g. a run's page in the MLflow UI).
        out: PNG to write (parent folders are created).
        expect: strings the rendered page must show before it is captured.
        click: texts of buttons or links to click once it shows them (e.g. "Show more").
        size: viewport width and height in CSS pixels.
        timeout: seconds for the browser to start and the page to show ``expect``.

    Raises:
        BrowserError: no Chromium on PATH, it failed to start, or the text never appeared
            (the message lists what was missing and the start of what the page showed).
    """
    browser = find_browser()
    if browser is None:
        tried = ", ".join(BROWSERS)
        raise BrowserError(f"no Chromium found on PATH (tried {tried}); on Debian: apt-get install chromium")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wsss-chromium-", ignore_cleanup_errors=True) as profile:
        argv = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "about:blank"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ws_url = _page_websocket(Path(profile), proc, timeout)
            text = asyncio.run(_capture(ws_url, url, out, expect, click, size, timeout))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return PageCapture(out, text, url)


def _page_websocket(profile: Path, proc: subprocess.Popen, timeout: float) -> str:
    """The DevTools websocket of the browser's first tab (the port is written into the profile)."""
    deadline = time.monotonic() + timeout
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrowserError(f"Chromium exited at start (code {proc.returncode})")
        if port_file.is_file() and (lines := port_file.read_text().split()):
            with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list", timeout=5) as reply:
                pages = [t for t in json.load(reply) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise BrowserError(f"Chromium did not open its DevTools port within {timeout:g} s")


async def _capture(ws_url: str, url: str, out: Path, expect: tuple[str, ...], click: tuple[str, ...],
                   size: tuple[int, int], timeout: float) -> str:  # fmt: skip
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        cdp = _Cdp(ws)
        width, height = size
        await cdp("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await cdp("Page.navigate", url=url)
        text = await _wait_for_text(cdp, expect, timeout)
        if await cdp.evaluate(CLOSE_ASSISTANT_JS):
            await asyncio.sleep(1.0)  # the panel slides away
        for label in click:
            if await cdp.evaluate(CLICK_TEXT_JS % json.dumps(label)):
                await asyncio.sleep(1.5)  # what it opens renders (and loads its images)
        text = await cdp.evaluate("document.body.innerText") or text
        shot = await cdp("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        return text


async def _wait_for_text(cdp: _Cdp, expect: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = await cdp.evaluate("document.body ? document.body.innerText : ''") or ""
        if text.strip() and all(s in text for s in expect):
            await asyncio.sleep(1.0)  # late sections (metrics, description) settle
            return text
        await asyncio.sleep(0.5)
    missing = [s for s in expect if s not in text]
    raise BrowserError(f"the page never showed {missing}; it showed: {' '.join(text.split())[:600]!r}")


class _Cdp:
    """Minimal DevTools protocol client: one command at a time, events ignored."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0

    async def __call__(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            reply = json.loads((await self.ws.receive()).data)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"DevTools {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    async def evaluate(self, expression: str):
        result = await self("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")
