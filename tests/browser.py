"""Headless Chromium on a machine with no route off it, driven over the DevTools protocol.

Chromium talks DevTools on a pipe (`--remote-debugging-pipe`: it reads commands on fd 3 and
writes answers and events on fd 4, one JSON message per NUL), so no port is opened and nothing
beyond the standard library is needed. Every name resolves to nothing except 127.0.0.1 and
localhost, and every other request goes to a proxy port where nothing listens: a page that
needs the internet fails here as it would on an offline greenhouse network.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Chromium:
    def __init__(self, binary: str, profile: Path, log: Path, width: int = 1280, height: int = 1600):
        self._dead_proxy = socket.socket()  # bound, never listening: connections to it are refused
        self._dead_proxy.bind(("127.0.0.1", 0))
        proxy_port = self._dead_proxy.getsockname()[1]
        flags = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-default-apps", "--metrics-recording-only",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
            f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=127.0.0.1;localhost",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-pipe",
            "about:blank",
        ]
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # copies above fd 10, so that the child's dup2 onto 3 and 4 never overwrites one of them
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def map_pipes() -> None:  # in the child, before exec: dup2 leaves 3 and 4 inheritable
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        with open(log, "ab") as handle:
            self.proc = subprocess.Popen([binary, *flags], stdin=subprocess.DEVNULL, stdout=handle,
                                         stderr=subprocess.STDOUT, close_fds=False, preexec_fn=map_pipes)
        os.close(child_in)
        os.close(child_out)
        self._out = to_browser_w
        self._in = from_browser_r
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._in, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._answers[-1] = {"error": {"message": "browser closed the pipe"}}
                    self._cond.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cond.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 30.0, **params: Any) -> dict:
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._answers:
                if -1 in self._answers:
                    raise BrowserError(f"{method}: {self._answers[-1]['error']['message']}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"{method}: no answer within {timeout}s")
                self._cond.wait(left)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def new_page(self) -> "Page":
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, session)
        for domain in ("Page.enable", "Network.enable", "Runtime.enable"):
            page.call(domain)
        return page

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass
        self._dead_proxy.close()


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session

    def call(self, method: str, **params: Any) -> dict:
        return self.browser.call(method, self.session, **params)

    def goto(self, url: str) -> None:
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression[:80]}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str | None = None) -> Any:
        """Poll until the expression is truthy (pages render asynchronously); fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen within {timeout}s: {what or expression}")
            time.sleep(0.2)

    def click(self, selector: str, timeout: float = 30.0) -> None:
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})", timeout, selector)
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def type_into(self, selector: str, text: str, timeout: float = 30.0) -> None:
        """Replace the field's text as a user would (select all, type): React sees real input events."""
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})", timeout, selector)
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.call("Input.insertText", text=text)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))

    def requests(self) -> list[tuple[str, str | None]]:
        """(url, outcome) of every request the page made: None while it runs or when it loaded, else the
        failure's blockedReason ("csp": the browser refused it itself, nothing went on the network) or
        errorText."""
        events = [e for e in list(self.browser.events) if e.get("sessionId") == self.session]
        failed = {e["params"]["requestId"]: e["params"].get("blockedReason") or e["params"].get("errorText")
                  for e in events if e.get("method") == "Network.loadingFailed"}
        return [(e["params"]["request"]["url"], failed.get(e["params"]["requestId"]))
                for e in events if e.get("method") == "Network.requestWillBeSent"]
