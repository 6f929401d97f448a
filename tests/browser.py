"""Headless Chromium through the DevTools protocol: load a page, report its visible text, images and errors.

Debian's `chromium` (.ci/run installs it) is started with ``--remote-debugging-port=0``; the port it
picked is read from ``DevToolsActivePort`` in its profile folder, and the page is driven over a
websocket (websocket-client). No webdriver, no network.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width > 0})))"""
TEXT_JS = "document.body.innerText"  # what a reader sees: rendered text only (nothing hidden by CSS)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    images: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)
    title: str = ""
    text: str = ""  # the page's visible text
    scroll_width: int = 0  # the document's width in CSS pixels: wider than the window means sideways scrolling


class _DevTools:
    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout:.0f} s")
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def _errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
    return errors


def check_page(chromium: str, page: Path, screenshot: Path, profile: Path, timeout: float = 60,
               width: int = 1280) -> PageCheck:
    """Open `page` (a local file) in headless Chromium `width` pixels wide, save a full-page PNG screenshot, report
    what loaded."""
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
           "--remote-allow-origins=*", f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank"]
    log = profile / "chromium.log"  # a file, not a pipe: a chatty browser must never block on a full pipe
    with log.open("wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(profile)})
    tools: _DevTools | None = None
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium did not start (exit {process.poll()}): {tail}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        page_target = next(t for t in targets if t.get("type") == "page")
        tools = _DevTools(page_target["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            tools.call(f"{domain}.enable")
        # the window cannot be made narrower than ~500 px: a phone's width is emulated, as DevTools' device mode does
        tools.call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                   mobile=width < 600)
        tools.call("Page.navigate", url=page.resolve().as_uri())
        tools.wait_event("Page.loadEventFired", timeout)
        images = json.loads(tools.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)["result"]["value"])
        title = tools.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
        text = tools.call("Runtime.evaluate", expression=TEXT_JS, returnByValue=True)["result"]["value"]
        scroll_width = tools.call("Runtime.evaluate", expression="document.documentElement.scrollWidth",
                                  returnByValue=True)["result"]["value"]
        shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return PageCheck(images=images, errors=_errors(tools.events), title=title, text=text,
                         scroll_width=int(scroll_width))
    finally:
        if tools is not None:
            tools.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
