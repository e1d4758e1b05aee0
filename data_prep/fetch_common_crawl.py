"""Fetch Common Crawl WET files by crawl id, resumably and verified.

    python data_prep/fetch_common_crawl.py --crawl CC-MAIN-2024-10 --segments 4 --output data/cc \\
        [--offset 0] [--base_url https://data.commoncrawl.org] [--workers 4] [--urls_only]

Reads ``<base_url>/crawl-data/<crawl>/wet.paths.gz`` (the crawl's list of WET files, in
Common Crawl's order) and selects entries ``offset .. offset+segments-1`` of it: the same
arguments always select the same files. Each file is downloaded to
``<output>/<path in the listing>`` (``crawl-data/<crawl>/segments/<seg>/wet/<name>.warc.wet.gz``):

  * streamed in 1 MiB blocks into ``<name>.part``, never held in memory;
  * a dropped connection or a short body is resumed with an HTTP ``Range`` request from the
    bytes already on disk (also across runs: an interrupted run continues its ``.part``);
  * 5xx, 408, 429, timeouts and connection errors are retried with exponential back-off
    (``--backoff`` seconds doubling, at most 60 s, ``--retries`` times); another 4xx is a
    clear error at once (wrong --crawl or --base_url);
  * the size is checked against Content-Length / Content-Range before the ``.part`` file is
    renamed to its final name, so a final name always means a complete file;
  * files already complete (same size as the server reports) are not downloaded again.

A progress bar shows bytes and MB/s. ``<output>/fetch_manifest.json`` (written atomically)
records the crawl, the selection, and per file its URL, size and SHA-256, and which failed.

``--urls_only`` prints the selected URLs instead: prepare.py streams http(s) URLs given as --input
through the same resumable reader (``open_url``) without storing them:

    python data_prep/prepare.py --input $(python data_prep/fetch_common_crawl.py \\
        --crawl CC-MAIN-2024-10 --segments 4 --urls_only) --output data/cc_prepared ...
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import io
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fileio import write_json

DEFAULT_BASE_URL = "https://data.commoncrawl.org"
BLOCK = 1 << 20
DEFAULT_BACKOFF = 1.0  # seconds before the first retry; doubles per attempt
MAX_BACKOFF = 60.0
USER_AGENT = "codistill-data-prep/1 (fetch_common_crawl.py)"
_CRAWL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class FetchError(OSError):
    """A download that cannot succeed (4xx, retries exhausted, size mismatch): the message
    names the URL and what to check."""


def _sleep_backoff(attempt: int, backoff: float) -> None:
    time.sleep(min(MAX_BACKOFF, backoff * (2 ** attempt)))


def _total_from(resp, start: int) -> int | None:
    """Full size of the resource from Content-Range (206) or Content-Length (200)."""
    cr = resp.headers.get("Content-Range")
    if resp.status == 206 and cr:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", cr)
        if not m or int(m.group(1)) != start:
            raise http.client.HTTPException(f"bad Content-Range {cr!r} for a request from {start}")
        return None if m.group(3) == "*" else int(m.group(3))
    cl = resp.headers.get("Content-Length")
    return int(cl) if cl is not None else None


class ResumableStream(io.RawIOBase):
    """A read-only stream of an HTTP(S) resource that survives dropped connections.

    Reading picks up where it stopped with a Range request; 5xx/timeouts are retried with
    exponential back-off; a 4xx raises FetchError. The body is checked against the size the
    server announced: a short body counts as a dropped connection."""

    def __init__(self, url: str, start: int = 0, retries: int = 8, backoff: float | None = None,
                 timeout: float = 60.0):
        backoff = DEFAULT_BACKOFF if backoff is None else backoff
        self.url, self.pos, self.retries, self.backoff, self.timeout = url, start, retries, backoff, timeout
        self.total: int | None = None
        self.resp = None
        self.failures = 0  # consecutive failed attempts (reset by progress)
        self.reconnects = 0
        self._open()

    def readable(self):
        return True

    def _fail(self, why: str) -> None:
        self._close_resp()
        if self.failures >= self.retries:
            raise FetchError(f"{self.url}: giving up after {self.failures} failed attempts "
                             f"({why}); check the network or --base_url, then re-run (it "
                             "resumes)")
        _sleep_backoff(self.failures, self.backoff)
        self.failures += 1

    def _open(self) -> None:
        while True:
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if self.pos:
                headers["Range"] = f"bytes={self.pos}-"
            req = urllib.request.Request(self.url, headers=headers)
            try:
                resp = urllib.request.urlopen(req, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 416:  # nothing after self.pos: complete if the sizes agree
                    m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range") or "")
                    total = int(m.group(1)) if m else self.total
                    if total is not None and self.pos == total:
                        self.total, self.resp = total, None
                        return
                    raise FetchError(f"{self.url}: cannot resume from byte {self.pos}: the "
                                     f"server has {total if total is not None else '?'} bytes; "
                                     "delete the .part file and re-run") from None
                if e.code in _RETRY_STATUS or e.code >= 500:
                    self._fail(f"HTTP {e.code} {e.reason}")
                    continue
                raise FetchError(f"{self.url}: HTTP {e.code} {e.reason}; check --crawl and "
                                 "--base_url (the file or crawl does not exist there)") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                self._fail(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
                continue
            try:
                total = _total_from(resp, self.pos)
            except http.client.HTTPException as e:
                resp.close()
                self._fail(str(e))
                continue
            if self.pos and resp.status == 200:  # server ignored Range: skip what we have
                skip = self.pos
                try:
                    while skip:
                        n = len(resp.read(min(skip, BLOCK)))
                        if not n:
                            raise http.client.IncompleteRead(b"")
                        skip -= n
                except (OSError, http.client.HTTPException) as e:
                    resp.close()
                    self._fail(f"{type(e).__name__} while skipping to byte {self.pos}")
                    continue
            if total is not None:
                if self.total is not None and total != self.total:
                    resp.close()
                    raise FetchError(f"{self.url}: size changed from {self.total} to {total} "
                                     "bytes between requests; re-run to download it afresh")
                self.total = total
            self.resp = resp
            return

    def _close_resp(self) -> None:
        if self.resp is not None:
            try:
                self.resp.close()
            except Exception:  # noqa: BLE001
                pass
            self.resp = None

    def readinto(self, b) -> int:
        while True:
            if self.resp is None:
                if self.total is not None and self.pos >= self.total:
                    return 0
                self.reconnects += 1
                self._open()
                continue
            try:
                n = self.resp.readinto(b)
            except (OSError, http.client.HTTPException) as e:  # dropped, reset, timed out
                self._fail(f"{type(e).__name__} at byte {self.pos}")
                continue
            if n:
                self.pos += n
                self.failures = 0
                return n
            # end of this response's body
            if self.total is None or self.pos >= self.total:
                if self.total is not None and self.pos > self.total:
                    raise FetchError(f"{self.url}: got {self.pos} bytes, more than the "
                                     f"announced {self.total}")
                self._close_resp()
                self.total = self.pos
                return 0
            self._fail(f"connection closed at byte {self.pos} of {self.total}")

    def close(self):
        self._close_resp()
        super().close()


def open_url(url: str, **kw) -> ResumableStream:
    """A raw, resumable read stream of ``url`` (used by prepare.py for URL inputs)."""
    return ResumableStream(url, **kw)


# ----------------------------------------------------------------------------- downloads
def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def remote_size(url: str, retries: int = 8, backoff: float = 1.0, timeout: float = 60.0):
    """Content-Length from a HEAD request (None if the server does not say)."""
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                cl = r.headers.get("Content-Length")
                return int(cl) if cl is not None else None
        except urllib.error.HTTPError as e:
            if e.code not in _RETRY_STATUS and e.code < 500:
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}; check --crawl and "
                                 "--base_url") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            pass
        if attempt < retries:
            _sleep_backoff(attempt, backoff)
    raise FetchError(f"{url}: HEAD failed {retries + 1} times; check the network or --base_url")


def download(url: str, dest: Path, retries: int = 8, backoff: float = 1.0,
             timeout: float = 60.0, progress=None) -> dict:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed if present); verify the
    size; rename. Returns {"url", "path", "bytes", "sha256", "resumed_from", "reconnects"}."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        size = remote_size(url, retries, backoff, timeout)
        if size is None or dest.stat().st_size == size:
            if progress is not None:
                progress(0, dest.stat().st_size)
            return {"url": url, "path": str(dest), "bytes": dest.stat().st_size,
                    "sha256": _sha256_file(dest), "resumed_from": None, "reconnects": 0,
                    "already_present": True}
        dest.unlink()  # a different size: fetch it again
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    sha = hashlib.sha256()
    if start:
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                sha.update(block)
    stream = ResumableStream(url, start=start, retries=retries, backoff=backoff, timeout=timeout)
    try:
        if stream.total is not None and progress is not None:
            progress(stream.total, start)
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        with open(part, "ab") as f:
            while True:
                n = stream.readinto(view)
                if not n:
                    break
                f.write(view[:n])
                sha.update(view[:n])
                if progress is not None:
                    progress(0, n)
            f.flush()
            os.fsync(f.fileno())
        size = part.stat().st_size
        if stream.total is not None and size != stream.total:
            raise FetchError(f"{url}: {part} has {size} bytes, the server announced "
                             f"{stream.total}; re-run to resume")
        os.replace(part, dest)
    finally:
        stream.close()
    return {"url": url, "path": str(dest), "bytes": size, "sha256": sha.hexdigest(),
            "resumed_from": start or None, "reconnects": stream.reconnects}


# ----------------------------------------------------------------------------- selection
def listing_url(base_url: str, crawl: str) -> str:
    return f"{base_url.rstrip('/')}/crawl-data/{crawl}/wet.paths.gz"


def select_paths(lines, offset: int, segments: int, source: str) -> list[str]:
    """Entries offset .. offset+segments-1 of the listing (validated relative paths)."""
    out = []
    for i, line in enumerate(lines):
        if i < offset:
            continue
        if len(out) == segments:
            break
        p = line.strip()
        if not p or p.startswith("/") or ".." in p.split("/") or "://" in p:
            raise FetchError(f"{source}: line {i + 1} is not a relative WET path ({p[:80]!r})")
        out.append(p)
    if len(out) < segments:
        raise FetchError(f"{source} lists only {offset + len(out)} WET files; lower --offset "
                         f"({offset}) or --segments ({segments})")
    return out


def _listing_lines(fileobj):
    with gzip.open(fileobj, "rt", encoding="utf-8") as f:
        yield from f


def check_args(crawl: str, segments: int, offset: int, workers: int, base_url: str) -> None:
    if not _CRAWL_RE.match(crawl or ""):
        raise FetchError(f"--crawl {crawl!r} is not a crawl id like CC-MAIN-2024-10")
    if segments < 1:
        raise FetchError(f"--segments must be >= 1 (got {segments})")
    if offset < 0:
        raise FetchError(f"--offset must be >= 0 (got {offset})")
    if workers < 1:
        raise FetchError(f"--workers must be >= 1 (got {workers})")
    if not base_url.lower().startswith(("http://", "https://")):
        raise FetchError(f"--base_url {base_url!r} must start with http:// or https://")


def selected_urls(crawl: str, segments: int, offset: int = 0, base_url: str = DEFAULT_BASE_URL,
                  retries: int = 8, backoff: float = 1.0, timeout: float = 60.0) -> list[str]:
    """The selected WET URLs, streaming the listing (nothing is stored)."""
    check_args(crawl, segments, offset, 1, base_url)
    url = listing_url(base_url, crawl)
    stream = io.BufferedReader(ResumableStream(url, retries=retries, backoff=backoff,
                                               timeout=timeout), BLOCK)
    with stream:
        paths = select_paths(_listing_lines(stream), offset, segments, url)
    return [f"{base_url.rstrip('/')}/{p}" for p in paths]


def fetch(crawl: str, segments: int, output, offset: int = 0, base_url: str = DEFAULT_BASE_URL,
          workers: int = 4, retries: int = 8, backoff: float = 1.0, timeout: float = 60.0,
          quiet: bool = False) -> dict:
    """Download the selected WET files into ``output``; returns the manifest (also written to
    ``output/fetch_manifest.json``). Raises FetchError if any file failed (after writing the
    manifest, which lists the failures)."""
    check_args(crawl, segments, offset, workers, base_url)
    from tqdm import tqdm

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")
    lurl = listing_url(base, crawl)
    listing = download(lurl, output / "wet.paths.gz", retries, backoff, timeout)
    with open(output / "wet.paths.gz", "rb") as f:
        try:
            paths = select_paths(_listing_lines(f), offset, segments, lurl)
        except (OSError, EOFError, UnicodeDecodeError) as e:
            if isinstance(e, FetchError):
                raise
            (output / "wet.paths.gz").unlink()
            raise FetchError(f"{lurl} is not a gzip list of WET paths ({e}); check --base_url "
                             "and --crawl") from None
    lock = threading.Lock()
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1000, desc=f"fetch {crawl}",
               disable=quiet, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def progress(add_total: int, done: int) -> None:
        with lock:
            if add_total:
                bar.total = (bar.total or 0) + add_total
                bar.refresh()
            if done:
                bar.update(done)

    def one(path: str):
        try:
            return download(f"{base}/{path}", output / path, retries, backoff, timeout, progress)
        except FetchError as e:
            return {"url": f"{base}/{path}", "path": str(output / path), "error": str(e)}

    t0 = time.time()
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, paths))
    elapsed = time.time() - t0
    files = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    nbytes = sum(r["bytes"] for r in files)
    manifest = {
        "crawl": crawl, "base_url": base, "offset": offset, "segments": segments,
        "selection": "entries offset .. offset+segments-1 of wet.paths.gz, in its order",
        "listing": {"url": lurl, "path": "wet.paths.gz", "bytes": listing["bytes"],
                    "sha256": listing["sha256"]},
        "files": [{"url": r["url"], "path": os.path.relpath(r["path"], output),
                   "bytes": r["bytes"], "sha256": r["sha256"]} for r in files],
        "failed": [{"url": r["url"], "error": r["error"]} for r in failed],
        "bytes": nbytes, "seconds": round(elapsed, 3),
        "complete": not failed,
    }
    write_json(output / "fetch_manifest.json", manifest, indent=1, sort_keys=False)
    if not quiet:
        print(f"fetched {len(files)}/{len(paths)} WET files of {crawl}, {nbytes / 1e6:.1f} MB in "
              f"{elapsed:.1f} s ({nbytes / 1e6 / max(elapsed, 1e-9):.1f} MB/s) -> {output} "
              f"(manifest {output / 'fetch_manifest.json'})", file=sys.stderr)
    if failed:
        raise FetchError(f"{len(failed)} of {len(paths)} files failed, first: "
                         f"{failed[0]['error']} (the manifest lists them; re-run to retry, "
                         "completed files are kept)")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download Common Crawl WET files of one crawl "
                                "(resumable, verified, parallel).")
    p.add_argument("--crawl", required=True, help="crawl id, e.g. CC-MAIN-2024-10")
    p.add_argument("--segments", type=int, required=True,
                   help="number of WET files to fetch (entries of wet.paths.gz)")
    p.add_argument("--offset", type=int, default=0, help="first entry of wet.paths.gz to fetch")
    p.add_argument("--output", help="directory for the files and fetch_manifest.json")
    p.add_argument("--base_url", default=DEFAULT_BASE_URL,
                   help="Common Crawl endpoint or a mirror (default %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--retries", type=int, default=8, help="attempts per failure streak")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds (doubles, at most 60 s)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    p.add_argument("--urls_only", action="store_true",
                   help="print the selected URLs (for prepare.py --input URL ...) and exit")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.urls_only:
            for u in selected_urls(args.crawl, args.segments, args.offset, args.base_url,
                                   args.retries, args.backoff, args.timeout):
                print(u)
            return 0
        if not args.output:
            raise FetchError("--output DIR is required (or --urls_only)")
        fetch(args.crawl, args.segments, args.output, args.offset, args.base_url, args.workers,
              args.retries, args.backoff, args.timeout, args.quiet)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed files are in place, .part files resume on the next run",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
