"""Open an HTML file in headless Chromium and report what a person opening it would see go wrong.

Used by ``tests/test_report_chromium.py`` on the job's ``prefix_report.html``. Two parts:

* :func:`ensure_chromium` finds Debian's ``chromium`` (or ``$CSID_CHROMIUM``) and, when it is missing
  and this process is root on a machine with ``apt-get`` (CI), installs it with
  ``apt-get install -y --no-install-recommends chromium`` (``apt-get update`` first only when the
  package lists do not know it). Otherwise it raises :class:`ChromiumMissing` naming the command.
  Idempotent: once installed, a call costs one ``PATH`` look-up.
* :class:`Browser` drives that Chromium through the DevTools protocol (CDP) over
  ``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3 (commands)
  and 4 (replies and events).

Why CDP over a pipe, and not the alternatives:

* ``--headless --dump-dom --enable-logging=stderr`` cannot say whether an ``<img>`` decoded (the DOM
  of a broken image looks like that of a good one), and its stderr log format changes between
  Chromium releases and misses errors thrown after the dump.
* The PyPI ``playwright`` package pins a Chromium build of its own; driving Debian's newer or older
  ``chromium`` through it works only while the protocol it expects still matches, and it adds a
  Node.js driver (~40 MB) to the CI environment for one test.
* A DevTools websocket needs a websocket client package and a TCP port (clashes between parallel
  runs). The pipe needs neither: standard library only, no port, and the protocol's stable core
  (Target, Page, Runtime, Log, Network) is all this needs. Playwright itself talks to Chromium this way.

What counts as broken (each becomes one line of :attr:`Rendered.errors`): an uncaught exception
(``Runtime.exceptionThrown``), a ``console.error``/``console.assert`` call, an error entry of the
browser log (``Log.entryAdded``, e.g. "Failed to load resource"), a failed load
(``Network.loadingFailed``, e.g. ``net::ERR_FILE_NOT_FOUND`` for a missing local file), and an ``<img>``
that did not decode (``naturalWidth`` 0 once it settled: a missing file, a corrupt ``data:`` URI).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers

PACKAGE = "chromium"
NAMES = ("chromium", "chromium-browser")


class ChromiumMissing(helpers.ToolMissing):
    """No Chromium binary, and none can be installed here; the message names the fix."""


def find_chromium() -> str | None:
    """``$CSID_CHROMIUM`` when set, else the first of ``chromium``/``chromium-browser`` on PATH."""
    override = os.environ.get("CSID_CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    return next((path for path in map(shutil.which, NAMES) if path), None)


def ensure_chromium() -> str:
    """The Chromium binary, installed from Debian's packages first when missing and this process can.

    Raises:
        ChromiumMissing: not found and not installable here (not root, no apt-get, or apt-get failed).
    """
    found = find_chromium()
    if found:
        return found
    if os.environ.get("CSID_CHROMIUM"):
        raise ChromiumMissing(f"CSID_CHROMIUM={os.environ['CSID_CHROMIUM']} is not a file: point it at a Chromium "
                              "or Chrome binary, or unset it to use `chromium` from PATH")
    fix = (f"install it with `sudo apt-get install -y --no-install-recommends {PACKAGE}` (Debian/Ubuntu), or set "
           "CSID_CHROMIUM to a Chromium or Chrome binary")
    return helpers.apt_install(PACKAGE, find_chromium, fix, ChromiumMissing)


@dataclass
class Rendered:
    """What one page load showed.

    Attributes:
        url: the page.
        title: ``document.title``.
        text: ``document.body.innerText`` (what a reader sees, markup gone).
        images: one dict per ``<img>``: ``src`` (cut to 120 characters), ``alt``, ``width``/``height``
            (natural size; 0 when it did not decode).
        requests: URLs the page asked for (``data:`` URIs cut to 40 characters).
        errors: everything that went wrong, one line each (empty: the page is fine).
    """

    url: str
    title: str = ""
    text: str = ""
    images: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# Waits for every image to settle (loaded or failed), then describes the page; run in the page.
_DESCRIBE = """
(async () => {
  const settle = img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done, {once: true}); img.addEventListener('error', done, {once: true}); });
  await Promise.all(Array.from(document.images, settle));
  return JSON.stringify({
    title: document.title,
    text: document.body ? document.body.innerText : '',
    images: Array.from(document.images, img => ({
      src: (img.currentSrc || img.src).slice(0, 120), alt: img.alt,
      width: img.naturalWidth, height: img.naturalHeight})),
  });
})()
"""


class Browser:
    """One headless Chromium driven over ``--remote-debugging-pipe``; :meth:`render` opens pages in it.

    Use as a context manager; the browser and its profile folder go away on exit.
    """

    def __init__(self, binary: str, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="csid-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [binary, "--headless", "--remote-debugging-pipe", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={self._profile}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
        # The pipe protocol wants fds 3 and 4 exactly; the shell moves the inherited ends there (no
        # preexec_fn: this process may have threads, e.g. the embedded Spark engine's).
        launcher = 'exec "$@" 3<&"$CSID_CDP_IN" 4>&"$CSID_CDP_OUT"'
        env = {**os.environ, "CSID_CDP_IN": str(to_browser_r), "CSID_CDP_OUT": str(from_browser_w)}
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._proc = subprocess.Popen(["bash", "-c", launcher, "chromium", *args], env=env,
                                      pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
                                      stdout=self._stderr, stderr=self._stderr)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        try:
            self.version = self._call("Browser.getVersion")["product"]
        except Exception:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self, page: str | Path, settle_s: float = 0.3) -> Rendered:
        """Open ``page`` (a local file or a URL) in a new tab, wait for its load event and every image,
        then ``settle_s`` more for late errors; describe what it showed and what went wrong."""
        url = Path(page).resolve().as_uri() if not str(page).startswith(("file:", "http:", "https:", "data:")) \
            else str(page)
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Runtime", "Log", "Network", "Page"):
                self._call(f"{domain}.enable", session=session)
            self._events = [e for e in self._events if e.get("sessionId") != session]
            navigated = self._call("Page.navigate", {"url": url}, session=session)
            result = Rendered(url)
            if navigated.get("errorText"):
                result.errors.append(f"navigation to {url} failed: {navigated['errorText']}")
                return result
            self._wait_for(lambda e: e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session)
            described = self._call("Runtime.evaluate", {"expression": _DESCRIBE, "awaitPromise": True,
                                                        "returnByValue": True}, session=session)
            if "exceptionDetails" in described:
                result.errors.append(f"describing the page failed: {_exception_text(described['exceptionDetails'])}")
                return result
            page_info = json.loads(described["result"]["value"])
            self._pump(time.monotonic() + settle_s)
            result.title, result.text, result.images = page_info["title"], page_info["text"], page_info["images"]
            result.errors += [f"image did not load (naturalWidth 0): src={img['src']!r} alt={img['alt']!r}"
                              for img in result.images if not img["width"]]
            urls: dict[str, str] = {}  # request id -> URL, for the lines of failed loads
            for event in (e for e in self._events if e.get("sessionId") == session):
                if event.get("method") == "Network.requestWillBeSent":
                    requested = event["params"]["request"]["url"]
                    urls[event["params"]["requestId"]] = requested = requested[:40] if requested.startswith(
                        "data:") else requested
                    result.requests.append(requested)
                line = _problem(event, urls)
                if line:
                    result.errors.append(line)
            return result
        finally:
            self._call("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send("Browser.close")
                self._proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a browser that does not close is killed below
                pass
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    # --- the protocol -----------------------------------------------------------------------------

    def _send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and return its result (events that arrive meanwhile are kept)."""
        sent = self._send(method, params, session)
        reply = self._wait_for(lambda m: m.get("id") == sent, keep=False)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return dict(reply.get("result", {}))

    def _wait_for(self, wanted: Any, keep: bool = True) -> dict[str, Any]:
        """The first message (kept event or new) for which ``wanted(message)`` is true."""
        deadline = time.monotonic() + self.timeout_s
        checked = 0
        while True:
            for message in self._events[checked:]:
                if wanted(message):
                    if not keep:
                        self._events.remove(message)
                    return message
            checked = len(self._events)
            if not self._pump(deadline, once=True):
                raise TimeoutError(f"Chromium sent nothing awaited for {self.timeout_s:.0f} s; its log:\n"
                                   f"{self._log()[-3000:]}")

    def _pump(self, deadline: float, once: bool = False) -> bool:
        """Read messages into the event list until ``deadline`` (or the first read, with ``once``);
        False when nothing came."""
        got = False
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                break
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self._proc.poll()}); its log:\n{self._log()[-3000:]}")
            self._buffer += chunk
            *messages, self._buffer = self._buffer.split(b"\0")
            self._events += [json.loads(m) for m in messages if m]
            got = got or bool(messages)
            if once and got:
                break
        return got

    def _log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")


def _exception_text(details: dict[str, Any]) -> str:
    exception = details.get("exception") or {}
    where = f" at {details.get('url', '')}:{details.get('lineNumber', 0) + 1}" if details.get("url") else ""
    return f"{exception.get('description') or details.get('text', 'exception')}{where}".splitlines()[0]


def _problem(event: dict[str, Any], urls: dict[str, str]) -> str | None:
    """One line for an event that means the page is broken, else None."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        return f"uncaught exception: {_exception_text(params['exceptionDetails'])}"
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        return f"console.{params['type']}: {args}"
    if method == "Log.entryAdded" and params["entry"].get("level") == "error":
        entry = params["entry"]
        return f"browser log error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip()
    if method == "Network.loadingFailed" and not params.get("canceled"):
        return f"load failed: {params.get('errorText')} {urls.get(params.get('requestId', ''), '(unknown URL)')}"
    return None
