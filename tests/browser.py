"""A headless Chromium for tests, driven over the Chrome DevTools Protocol with the standard library only.

Chromium comes from the system (Debian's ``chromium`` package: ``infra/setup-test.sh``); nothing is
downloaded at run time. The browser talks CDP over a pair of pipes (``--remote-debugging-pipe``: JSON
messages ended by a NUL byte on file descriptors 3 and 4), so there is no port to pick and no websocket
client to install. Each ``Browser`` gets a throwaway profile, HOME and TMPDIR in one temporary folder,
runs in its own process group, and both are gone after ``close()``.

Use::

    if (chromium := find_chromium()) is None:
        pytest.skip("Chromium is not installed: run infra/setup-test.sh")
    with Browser(chromium) as browser:
        text = browser.text("http://127.0.0.1:5000/#/models", until="my-model", timeout_s=30)
        rows = browser.texts('[role="row"]', until=lambda rows: len(rows) > 2)

or, for one page, ``rendered_text(url, until="my-model")``. ``text`` and ``texts`` poll the page's
rendered text (``innerText``, non-breaking spaces made plain) until ``until`` holds, so single-page apps
have time to fetch and render; ``TimeoutError`` says what the page showed last.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

# Looked for in this order on PATH, after $CHROMIUM; Debian's is `chromium`.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome", "chrome")

# The page's text as a user sees it; "" until the page has a body.
_BODY_TEXT = "document.body ? document.body.innerText : ''"


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable: ``$CHROMIUM`` if set, else the first of ``CHROMIUM_NAMES`` on
    PATH; None if there is none."""
    if explicit := os.environ.get("CHROMIUM"):
        return shutil.which(explicit)
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    return None


class BrowserError(RuntimeError):
    """Chromium failed: it did not start, it exited, or a DevTools command or a page's script failed."""


def _pipe() -> tuple[int, int]:
    """A pipe whose two ends are numbered 10 or above, so that moving them to 3 and 4 cannot clobber them."""
    ends = os.pipe()
    try:
        read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in ends)
    finally:
        for fd in ends:
            os.close(fd)
    return read_end, write_end


def _kill_strays(marker: str) -> None:
    """SIGKILL the processes whose command line names ``marker`` (a Browser's temporary folder): Chromium's
    crash handlers start their own sessions, so the process group kill misses them."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            command_line = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in command_line:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)


def _plain(text: str) -> str:
    return text.replace("\xa0", " ")


class Browser:
    """One headless Chromium with one tab. ``goto`` loads a page afresh; ``text``/``texts``/``wait_for``
    poll it. Not thread-safe."""

    def __init__(self, executable: str | None = None, *, window_size: tuple[int, int] = (1280, 1024)):
        found = executable or find_chromium()
        if found is None:
            raise FileNotFoundError(
                "Chromium was not found: run infra/setup-test.sh (apt-get install chromium)"
            )
        self.executable = found
        self.window_size = window_size
        self._process: subprocess.Popen[bytes] | None = None
        self._home: Path | None = None
        self._to_browser: int | None = None
        self._from_browser: int | None = None
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    # --- life cycle -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> Browser:
        if self._process is not None:
            return self
        self._home = Path(tempfile.mkdtemp(prefix="test-chromium-"))
        for sub in ("profile", "home", "tmp"):
            (self._home / sub).mkdir()
        # Ours: commands go into `to_write`, Chromium reads them on its fd 3; it answers on its fd 4.
        to_read, to_write = _pipe()
        from_read, from_write = _pipe()
        width, height = self.window_size
        command = [
            "bash",  # not dash: its redirections take one-digit descriptors only
            "-c",
            # Move the pipe ends to 3 and 4, where Chromium expects them (no preexec_fn: tests have threads).
            f'exec "$0" "$@" 3<&{to_read} 4>&{from_write} {to_read}<&- {from_write}>&-',
            self.executable,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # as root Chromium will not start with its sandbox; tests only visit loopback
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a small /dev/shm
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--password-store=basic",
            "--mute-audio",
            f"--window-size={width},{height}",
            f"--user-data-dir={self._home / 'profile'}",
            "about:blank",
        ]
        env = {
            **os.environ,
            # Keep Chromium's crash-report folder, dconf and NSS database out of the user's HOME.
            "HOME": str(self._home / "home"),
            "XDG_CONFIG_HOME": str(self._home / "home" / ".config"),
            "XDG_CACHE_HOME": str(self._home / "home" / ".cache"),
            "TMPDIR": str(self._home / "tmp"),
        }
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        try:
            with (self._home / "chromium.log").open("ab") as log:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=(to_read, from_write),
                    start_new_session=True,  # its own process group: close() ends Chromium and its children
                )
        except BaseException:
            for fd in (to_read, to_write, from_read, from_write):
                os.close(fd)
            self._cleanup()
            raise
        os.close(to_read)
        os.close(from_write)
        self._to_browser, self._from_browser = to_write, from_read
        try:
            target = self._call("Target.createTarget", {"url": "about:blank"}, timeout_s=timeout_s)
            attached = self._call(
                "Target.attachToTarget",
                {"targetId": target["targetId"], "flatten": True},
                timeout_s=timeout_s,
            )
            self._session = attached["sessionId"]
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close Chromium (politely, then SIGKILL to its process group) and delete its temporary folder."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(BrowserError, TimeoutError, OSError):
                self._call("Browser.close", timeout_s=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # renderers and the zygote, if any outlived it
            process.wait()
        if self._home is not None:
            _kill_strays(str(self._home))
        self._cleanup()

    def _cleanup(self) -> None:
        for name in ("_to_browser", "_from_browser"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        self._buffer, self._session = b"", None
        home, self._home = self._home, None
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- DevTools protocol ----------------------------------------------------------------------------

    def _log_tail(self, lines: int = 15) -> str:
        if self._home is None or not (self._home / "chromium.log").exists():
            return ""
        text = (self._home / "chromium.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _died(self) -> BrowserError:
        code = self._process.poll() if self._process is not None else None
        return BrowserError(f"Chromium exited (code {code}); its log ends with:\n{self._log_tail()}")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._from_browser is not None
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if not ready:
                if self._process is not None and self._process.poll() is not None:
                    raise self._died()
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise self._died()
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = False,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Send one CDP command (to the tab if ``session``, else to the browser) and return its result."""
        if self._to_browser is None:
            raise BrowserError("the browser is not started")
        self._next_id += 1
        request: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            request["sessionId"] = self._session
        data = json.dumps(request).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._to_browser, data) :]
        except BrokenPipeError:
            raise self._died() from None
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._read_message(deadline)
            if message.get("id") == request["id"]:
                if "error" in message:
                    raise BrowserError(
                        f"{method} failed: {message['error'].get('message', message['error'])}"
                    )
                return message.get("result", {})
            if message.get("method") == "Inspector.targetCrashed":
                raise BrowserError(f"the tab crashed; Chromium's log ends with:\n{self._log_tail()}")
            # Other events are not needed.

    # --- pages ----------------------------------------------------------------------------------------

    def goto(self, url: str, timeout_s: float = 30.0) -> None:
        """Load ``url`` as a new document (via about:blank, so that a changed #fragment reloads the app too,
        and the previous page's text cannot satisfy a later ``until``)."""
        for target in ("about:blank", url):
            result = self._call("Page.navigate", {"url": target}, session=True, timeout_s=timeout_s)
            if result.get("errorText"):
                raise BrowserError(f"could not load {target}: {result['errorText']}")

    def evaluate(self, expression: str, timeout_s: float = 30.0) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self._call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
            timeout_s=timeout_s,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(
                f"{expression!r} threw: {details.get('exception', {}).get('description', details)}"
            )
        return result["result"].get("value")

    def wait_for(
        self,
        expression: str,
        until: Callable[[Any], bool] = bool,
        *,
        timeout_s: float = 30.0,
        interval_s: float = 0.25,
    ) -> Any:
        """Evaluate ``expression`` every ``interval_s`` until ``until(value)`` holds; return that value.

        Script errors count as "not yet" (the document may be between loads). TimeoutError after
        ``timeout_s`` quotes the last value or error."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            try:
                last = self.evaluate(expression, timeout_s=max(deadline - time.monotonic(), 1.0))
                if until(last):
                    return last
            except BrowserError as e:
                if self._process is None or self._process.poll() is not None:
                    raise
                last = e
            if time.monotonic() >= deadline:
                shown = (
                    last if isinstance(last, BrowserError) else json.dumps(last, ensure_ascii=False)[:4000]
                )
                raise TimeoutError(
                    f"the page did not satisfy the condition within {timeout_s:.0f} s; last: {shown}"
                )
            time.sleep(interval_s)

    def text(
        self,
        url: str | None = None,
        *,
        until: str | Callable[[str], bool] | None = None,
        timeout_s: float = 30.0,
    ) -> str:
        """The page's rendered text, once it contains ``until`` (a string) or ``until(text)`` holds
        (default: any text). Loads ``url`` first if given."""
        if url is not None:
            self.goto(url, timeout_s=timeout_s)
        if until is None:
            check: Callable[[str], bool] = bool
        elif isinstance(until, str):
            wanted = until
            check = lambda text: wanted in text  # noqa: E731
        else:
            check = until
        text = self.wait_for(
            _BODY_TEXT, lambda value: isinstance(value, str) and check(_plain(value)), timeout_s=timeout_s
        )
        return _plain(text)

    def texts(
        self,
        selector: str,
        url: str | None = None,
        *,
        until: Callable[[list[str]], bool] = bool,
        timeout_s: float = 30.0,
    ) -> list[str]:
        """The rendered text of each element matching the CSS ``selector`` (e.g. a table's
        ``[role="row"]``), once ``until(texts)`` holds (default: at least one). Loads ``url`` first if
        given."""
        if url is not None:
            self.goto(url, timeout_s=timeout_s)
        expression = f"Array.from(document.querySelectorAll({json.dumps(selector)}), e => e.innerText)"
        values = self.wait_for(
            expression,
            lambda value: isinstance(value, list) and until([_plain(v) for v in value]),
            timeout_s=timeout_s,
        )
        return [_plain(v) for v in values]


def rendered_text(
    url: str,
    until: str | Callable[[str], bool] | None = None,
    timeout_s: float = 30.0,
    executable: str | None = None,
) -> str:
    """Start a browser, return ``url``'s rendered text once it satisfies ``until`` (see
    ``Browser.text``), and close it."""
    with Browser(executable) as browser:
        return browser.text(url, until=until, timeout_s=timeout_s)
