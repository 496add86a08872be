"""Resolve a task's image reference to pixels, treating every URL as hostile.

Accepted: LS-relative paths (`/data/upload/...`, `/tasks/.../resolve/...`) fetched from Label Studio with
its legacy token; local-files URLs (from Label Studio, or under TESSERA_MEDIA_ROOT when that is set); cloud
storage URIs (`s3://`, `gs://`, `azure-blob://`) through Label Studio's resolver for the task; http(s) URLs
on allow-listed hosts (by default only Label Studio's own); `data:` URIs; plain paths under
TESSERA_MEDIA_ROOT. Caps on bytes and pixels; no path escapes the media root; the token is only ever sent
to the Label Studio host. No redirect is followed but one: from Label Studio's storage resolver to the
presigned URL it made (without the token).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import jwt
import numpy as np
import requests
import requests.adapters
import urllib3
import urllib3.connection
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tessera.backend.settings import Settings
from tessera.backend.urls import Origin, UnsafeURL, parse_host_entry, parse_http_url, path_prefix
from tessera.model.data import image_to_rgb

logger = logging.getLogger(__name__)


class MediaError(ValueError):
    """An image reference that cannot or may not be loaded; the message says why (never the token).

    `retry`: the failure is in the connection or a setting (Label Studio unreachable or slow, a refused key, a
    CA, a storage not connected, a host not allowed), not in the task, so the same reference may load later.
    /predict stores no prediction for such a task (it is asked again at the next "Retrieve predictions"),
    where an empty one would stand for the served version and Label Studio would never ask again."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


_SCHEME_AUTH = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@")
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
# Label Studio's own paths under a prefix that LABEL_STUDIO_URL does not have ("/ls/data/upload/1/x.png")
_PREFIXED_LS_PATH = re.compile(r"(/[^?#]+?)/(?:data/upload|data/local-files|tasks/[0-9]+/resolve|storage-data)/")
# Label Studio's storage resolver (label_studio/io_storages/urls.py, 1.23.2; `presign` is its older name): for a
# task's cloud URI it answers with the file (a storage set to proxy) or a 303 to a presigned URL (the default)
MAX_REDIRECTS = 5          # redirects one image download follows (requests' own default is 30)
_RESOLVER = re.compile(r"/(?:tasks|projects)/[0-9]+/(?:resolve|presign)/?$")
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _redact(url: str, limit: int = 120) -> str:
    """A URL for logs and errors: no query string (presigned URLs carry credentials), no userinfo."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    if url.startswith("data:"):
        return url[:30] + "..."
    shown = _SCHEME_AUTH.sub(r"\1***@", url.split("#", 1)[0].split("?", 1)[0])
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return shown[:limit] + ("?..." if "?" in url else "")


def _warn_once(message: str) -> None:
    with _warned_lock:
        if message in _warned or len(_warned) > 1000:
            return
        _warned.add(message)
    logger.warning(message)


def _origin(url: str) -> Origin | None:
    try:
        return parse_http_url(url)[0]
    except UnsafeURL:
        return None


def personal_token(token: str) -> bool:
    """Whether `token` is a Label Studio personal access token: a JWT refresh token (what Label Studio 1.23 hands
    out by default; legacy tokens are off for new organizations), not a legacy 40-hex key."""
    return _claims(token).get("token_type") == "refresh"


def _claims(token: str) -> dict:
    """A JWT's claims, unverified (Label Studio verifies them); {} for anything else."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, TypeError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


# (LS URL, sha256 of the personal token) -> (access token, time.monotonic() it is renewed at): one exchange per
# ~5 minutes per process, not one per image
_access: dict[tuple[str, str], tuple[str, float]] = {}
_access_lock = threading.Lock()


# ------------------------------------------------------------------------------ download deadline
# requests has per-read timeouts only. The connection classes below record the socket of the request in
# flight (per thread), so a timer can shut it down at the deadline, also while the headers trickle in.
_in_flight = threading.local()


class _Tracked:
    def request(self, *args, **kwargs):
        super().request(*args, **kwargs)
        watch = getattr(_in_flight, "watch", None)
        if watch is not None:
            watch["sock"] = self.sock


class _HTTPConnection(_Tracked, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _cut(watch: dict) -> None:
    watch["cut"] = True
    sock = watch.get("sock")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def deadline_session(pool_size: int = 10) -> requests.Session:
    """A requests session whose connections the download deadline can cut."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=pool_size)
    adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class MediaCache:
    """Downloaded media on disk, a file per key, at most `max_bytes` in all; the least recently used go first,
    but never a file this cache object has used (read or written): a file that would need one of them to go is
    not kept.

    A training run makes one of these and reads every annotated task's image, in the same order each run. With
    least-recently-used alone, a project whose images outgrow the cache evicted each one before the next run
    asked for it again: no run ever had a hit, and every run downloaded the whole project. Kept this way, the
    same images stay, and each run finds the share of the project the cache can hold.

    Hand-written (about 60 lines) rather than diskcache: diskcache keeps an SQLite index beside the files and
    pickles what it stores by default, and its last release is from 2023. Here a file's mtime is its recency
    (set to the nanosecond on every write and hit), writes are atomic renames and an eviction tolerates a
    file another process removed first, so several processes sharing MODEL_DIR share the cache safely.
    Listing the directory costs ~60 ms per 5,000 files on a loaded box, so a write lists it only when this
    process's count of the total would pass max_bytes (then it evicts down to LOW_WATER of it) or every
    RESCAN_EVERY writes (other processes' writes count too)."""
    LOW_WATER = 0.9
    RESCAN_EVERY = 64

    def __init__(self, root: Path, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"media cache size must be >= 1 byte, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._total: int | None = None          # bytes in the cache at the last listing, plus writes since
        self._writes = 0
        self._used: set[str] = set()            # keys this object read or wrote: not evicted by it

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        try:
            data = path.read_bytes()
            _touch(path)
        except FileNotFoundError:        # never cached, or evicted (perhaps by another process) meanwhile
            return None
        with self._lock:
            self._used.add(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:   # would evict everything and still not fit
            return
        with self._lock:
            self._writes += 1
            if (self._total is None or self._total + len(data) > self.max_bytes
                    or self._writes % self.RESCAN_EVERY == 0):
                self._total = self._evict(len(data))
            if self._total + len(data) > self.max_bytes:
                return                   # the cache holds what this run already used: this one is not kept
            self._total += len(data)
            self._used.add(key)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / key
        tmp = self.root / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with contextlib.suppress(FileNotFoundError):
            _touch(path)

    def _evict(self, room: int) -> int:
        """List the cache; if it has no room for `room` more bytes, remove the least recently used files this
        object has not used until the rest and `room` take LOW_WATER of max_bytes (and the tmp files of
        writers that died, once they are an hour old). Returns the bytes left."""
        entries, total = [], 0
        stale = time.time_ns() - 3600 * 10**9
        if not self.root.is_dir():
            return 0
        with os.scandir(self.root) as it:
            for e in it:
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if e.name.startswith("."):           # another writer's file in flight, or a dead one's
                    if st.st_mtime_ns < stale:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.path)
                    continue
                entries.append((st.st_mtime_ns, e.name, e.path, st.st_size))
                total += st.st_size
        if total + room <= self.max_bytes:
            return total
        for _, name, path, size in sorted(entries):
            if total + room <= self.max_bytes * self.LOW_WATER:
                break
            if name in self._used:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
        return total


def _touch(path: Path) -> None:
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class MediaResolver:
    """Fetch images for tasks. One per request context.

    Label Studio's URL and token come from the environment (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY) when set;
    then a request's `ls_url`/`token` are never used for media (a request token is used only when it came with
    that same Label Studio origin and no API key is configured). Without LABEL_STUDIO_URL, `ls_url` and `token`
    are the pair one /setup or /predict request carried: the token is bound to that origin and goes nowhere else.
    """

    def __init__(self, settings: Settings, ls_url: str = "", token: str = "", cache_dir: Path | None = None,
                 session: requests.Session | None = None):
        self.settings = settings
        ls_url = ls_url.rstrip("/") if isinstance(ls_url, str) else ""
        token = token if isinstance(token, str) else ""
        if settings.label_studio_url:
            self.ls_url = settings.label_studio_url.rstrip("/")
            self.ls_origin = _origin(self.ls_url)
            self.token = settings.label_studio_api_key
            if ls_url and _origin(ls_url) != self.ls_origin:
                _warn_once(f"a request names Label Studio at {_redact(ls_url)}; LABEL_STUDIO_URL "
                           f"({_redact(self.ls_url)}) is used for media and that host is not trusted")
            elif ls_url and token and not self.token:
                self.token = token          # it came with LABEL_STUDIO_URL's own origin
        else:
            self.ls_origin = _origin(ls_url) if ls_url else None
            self.ls_url = ls_url if self.ls_origin else ""
            self.token = token if self.ls_origin else ""
            if ls_url and self.ls_origin is None:
                _warn_once(f"Label Studio host {_redact(ls_url)} from a request is not a usable URL; ignored")
        self.ls_prefix = path_prefix(self.ls_url)                 # its uploads are <prefix>/data/upload/...
        self.allowed = [(h, None) if h == "*" else parse_host_entry(h) for h in settings.allowed_hosts]
        cache_bytes = settings.media_cache_mb * 2**20          # downloads kept under cache_dir (None: none)
        self.cache = MediaCache(cache_dir, cache_bytes) if cache_dir is not None and cache_bytes else None
        self.session = session or deadline_session(max(10, settings.fetch_threads))
        self.verify = str(settings.ca_bundle) if settings.ca_bundle else True      # per request: env can't override

    def is_allowed(self, origin: Origin) -> bool:
        """Media may come from Label Studio's origin and TESSERA_ALLOWED_HOSTS only."""
        if origin == self.ls_origin:
            return True
        return any(h == "*" or (h == origin.host and p in (None, origin.port)) for h, p in self.allowed)

    # ------------------------------------------------------------------------------------------- bytes
    def fetch(self, ref: str, task_id: Any = None) -> bytes:
        """Image reference -> raw bytes, within the byte cap. Raises MediaError (and nothing else). `task_id`:
        the task the reference is from (a cloud storage URI is resolved by Label Studio for its task)."""
        if not isinstance(ref, str) or not ref.strip():
            raise MediaError("the task has no image reference (empty or not a string)")
        try:
            return self._fetch(ref.strip(), task_id)
        except MediaError:
            raise
        except (ValueError, OSError, TypeError, UnicodeError) as e:   # NUL bytes, odd encodings, bad URLs
            raise MediaError(f"{_redact(ref)} cannot be read ({type(e).__name__})") from None

    def _fetch(self, ref: str, task_id: Any = None) -> bytes:
        if ref.startswith("data:"):
            return self._data_uri(ref)
        if self.ls_prefix and ref.startswith(self.ls_prefix + "/"):      # a path on Label Studio at its prefix
            ref = ref[len(self.ls_prefix):]
        parsed = urlsplit(ref)
        if parsed.path.startswith("/data/local-files") and "d" in parse_qs(parsed.query):
            return self._local_files(parse_qs(parsed.query)["d"][0])
        scheme = parsed.scheme.lower()
        if scheme in ("http", "https"):
            return self._http(ref)
        if scheme in CLOUD_SCHEMES:
            return self._cloud(ref, scheme, task_id)
        if scheme:
            raise MediaError(f"unsupported URL scheme {scheme!r} in {_redact(ref)}")
        if ref.startswith("/data/") or ref.startswith("/tasks/") or ref.startswith("/storage-data/"):
            if not self.ls_url:
                raise MediaError(f"{_redact(ref)} is a Label Studio path but the Label Studio URL is unknown: "
                                 "set LABEL_STUDIO_URL (or connect the backend so /setup sends it)", retry=True)
            return self._http(urljoin(self.ls_url + "/", ref.lstrip("/")))
        at = _PREFIXED_LS_PATH.match(ref)
        if at and self.settings.media_root is None:
            raise MediaError(f"{_redact(ref)} is a path on a Label Studio served under {at.group(1)!r}: set "
                             f"LABEL_STUDIO_URL to its address with that path (https://<host>{at.group(1)})",
                             retry=True)
        return self._local(ref)

    def _cloud(self, ref: str, scheme: str, task_id: Any) -> bytes:
        """A cloud storage URI as Label Studio's editor gets it: from LS's resolver for the task,
        /tasks/<id>/resolve/?fileuri=<the URI in url-safe base64>, with the token. Label Studio 1.23.2 sends
        tasks to ML backends with their storage URIs unresolved; it finds the project's storage for the URI
        and answers with the file or a redirect to a presigned URL (`_download` follows that one)."""
        if not self.ls_url:
            raise MediaError(f"{_redact(ref)} is a cloud storage URI ({scheme}://), which Label Studio resolves, but "
                             "the Label Studio URL is unknown: set LABEL_STUDIO_URL (or connect the backend so /setup "
                             "sends it)", retry=True)
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
            raise MediaError(f"{_redact(ref)} is a cloud storage URI ({scheme}://): Label Studio resolves it for a "
                             "task, and this one has no task id")
        fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
        try:
            return self._http(f"{self.ls_url}/tasks/{task_id}/resolve/?fileuri={fileuri}")
        except MediaError as e:
            raise MediaError(f"{_redact(ref)}: {e}", e.retry) from None

    def _local_files(self, path: str) -> bytes:
        """The file of a Label Studio local-files URL (/data/local-files/?d=PATH): read under TESSERA_MEDIA_ROOT
        when that is set (the storage's directory mounted here), else from Label Studio with the key, which
        serves it to whoever may see a project with a local storage holding it (LOCAL_FILES_SERVING_ENABLED;
        label_studio/io_storages/localfiles/views.py, 1.23.2), as upstream backends get it."""
        if self.settings.media_root is not None or not self.ls_url:
            return self._local(path)
        if "\0" in path:
            raise MediaError(f"{_redact(path)} holds a NUL byte")
        url = f"{self.ls_url}/data/local-files/?d={quote(path, safe='/')}"
        try:
            return self._http(url)
        except MediaError as e:
            raise MediaError(f"{e}; Label Studio serves local files with LOCAL_FILES_SERVING_ENABLED=true, or set "
                             "TESSERA_MEDIA_ROOT to the storage's directory mounted here", e.retry) from None

    def _data_uri(self, ref: str) -> bytes:
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise MediaError("only base64 data: URIs are accepted")
        if len(payload) * 3 // 4 > self.settings.max_image_bytes:
            raise MediaError(f"data: URI is over the {self.settings.max_image_bytes} byte cap")
        try:
            return base64.b64decode(payload, validate=False)
        except ValueError as e:
            raise MediaError(f"data: URI is not valid base64: {e}") from e

    def _local(self, path: str) -> bytes:
        root = self.settings.media_root
        if root is None:
            raise MediaError(f"{_redact(path)} is a local path; set TESSERA_MEDIA_ROOT to allow reading files "
                             "under one directory", retry=True)
        path = unquote(path)
        if "\0" in path:
            raise MediaError(f"{_redact(path)} holds a NUL byte")
        rel = Path(path)
        candidate = (rel if rel.is_absolute() else root / rel).resolve()   # resolve() follows .. and links
        if not candidate.is_relative_to(root):
            raise MediaError(f"{_redact(path)} is outside TESSERA_MEDIA_ROOT")
        if not candidate.is_file():
            raise MediaError(f"{_redact(path)} does not exist under TESSERA_MEDIA_ROOT")
        size = candidate.stat().st_size
        if size > self.settings.max_image_bytes:
            raise MediaError(f"{_redact(path)} is {size} bytes, over the {self.settings.max_image_bytes} byte cap")
        return candidate.read_bytes()

    def _http(self, url: str) -> bytes:
        try:
            origin, url = parse_http_url(url)       # from here on only the canonical URL is used
        except UnsafeURL as e:
            raise MediaError(f"{_redact(url)} is not accepted: {e}") from None
        if not self.is_allowed(origin):
            raise MediaError(f"host {origin.authority!r} is not allowed for media ({_redact(url)}); add it to "
                             "TESSERA_ALLOWED_HOSTS if it is trusted", retry=True)
        key = hashlib.sha256(url.encode()).hexdigest()
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            return cached
        data = self._download(url, origin)
        if self.cache is not None:
            self.cache.put(key, data)
        return data

    def _download(self, url: str, origin: Origin, hops: int = 0, keyed: bool = True,
                  deadline: float | None = None) -> bytes:
        """GET within the byte cap and one deadline for the whole exchange, redirects included (a host trickling
        its headers or body cannot hold a request past TESSERA_FETCH_TIMEOUT_S).

        Redirects are followed, at most MAX_REDIRECTS, to hosts media may come from (Label Studio's and
        TESSERA_ALLOWED_HOSTS: an image server's http -> https, a bucket's regional endpoint, a share link's
        download host), each target read as strictly as a task's URL. Label Studio's storage resolver may send
        its one to the presigned URL it made, on any host, for a storage the project's admin connected (what a
        task names cannot move it elsewhere: Label Studio answers 404 for a URI no storage of the project holds).
        The token goes to Label Studio's origin only, and after a redirect only where Label Studio itself sent
        the request on to its own origin."""
        # `keyed`: every hop so far was Label Studio's origin redirecting to itself (or none was made)
        headers = self._auth() if self.token and keyed and origin == self.ls_origin else {}
        resolver = origin == self.ls_origin and hops == 0 and _RESOLVER.search(urlsplit(url).path)
        location = None
        cap, budget = self.settings.max_image_bytes, self.settings.fetch_timeout_s
        deadline = deadline or time.monotonic() + budget
        left = max(0.05, deadline - time.monotonic())
        watch: dict = {}
        timer = threading.Timer(left, _cut, args=(watch,))
        timer.daemon = True
        _in_flight.watch = watch
        timer.start()
        try:
            with self.session.get(url, headers=headers, stream=True, timeout=(min(5.0, left), left),
                                  allow_redirects=False, verify=self.verify) as r:
                if 300 <= r.status_code < 400 and r.headers.get("Location"):
                    location = r.headers["Location"]
                elif 300 <= r.status_code < 400:
                    raise MediaError(f"{_redact(url)} redirects (HTTP {r.status_code}) without saying where")
                elif r.status_code != 200:
                    if r.status_code == 401 and headers.get("Authorization", "").startswith("Bearer "):
                        self._forget_access()             # revoked or expired early: the next fetch exchanges again
                    raise MediaError(f"{_redact(url)} answered HTTP {r.status_code}"
                                     + (" (check LABEL_STUDIO_API_KEY: a personal access token, or a legacy token "
                                        "where the organization allows them)" if r.status_code in (401, 403) else "")
                                     + (" (Label Studio found no storage of the task's project for it: connect the "
                                        "bucket as a source storage)" if resolver and r.status_code == 404 else ""),
                                     retry=r.status_code in (401, 403, 408, 429) or r.status_code >= 500
                                     or bool(resolver and r.status_code == 404))
                elif int(r.headers.get("Content-Length") or 0) > cap:
                    raise MediaError(f"{_redact(url)} is over the {cap} byte cap")
                buf = bytearray()
                while location is None:
                    if time.monotonic() >= deadline:
                        watch["cut"] = True
                        break
                    # read1: what one socket read gives, so the deadline is checked between reads
                    chunk = r.raw.read1(64 * 1024, decode_content=True)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > cap:
                        raise MediaError(f"{_redact(url)} is over the {cap} byte cap")
        except requests.exceptions.SSLError:
            raise MediaError(f"could not download {_redact(url)}: its TLS certificate is not trusted; give your CA "
                             "as TESSERA_CA_BUNDLE (or SSL_CERT_FILE)", retry=True) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            if not watch.get("cut"):
                hint = ""
                if isinstance(e, requests.exceptions.ProxyError):
                    hint = (f"; the proxy HTTP(S)_PROXY names failed for {origin.authority}: if that host is reached "
                            "directly, add it to NO_PROXY")
                elif origin == self.ls_origin and isinstance(e, requests.ConnectionError):
                    hint = (f"; Tessera cannot reach Label Studio at {origin.authority}: set LABEL_STUDIO_URL to the "
                            "address it is reached at from here (in Docker, the service's: http://label-studio:8080)")
                raise MediaError(f"could not download {_redact(url)}: {type(e).__name__}{hint}", retry=True) from None
        finally:
            timer.cancel()
            _in_flight.watch = None
        if watch.get("cut"):
            raise MediaError(f"{_redact(url)} took longer than {budget:g} s to download (TESSERA_FETCH_TIMEOUT_S)",
                             retry=True)
        if location is not None:
            try:
                target, target_url = parse_http_url(urljoin(url, location))
            except UnsafeURL as e:
                raise MediaError(f"{_redact(url)} redirects to a URL not accepted: {e}") from None
            if not resolver and not self.is_allowed(target):
                raise MediaError(f"{_redact(url)} redirects to host {target.authority!r}, which is not allowed for "
                                 "media; add it to TESSERA_ALLOWED_HOSTS if it is trusted", retry=True)
            if hops >= MAX_REDIRECTS:
                raise MediaError(f"{_redact(url)}: more than {MAX_REDIRECTS} redirects")
            keyed = keyed and not resolver and origin == self.ls_origin and target == self.ls_origin
            return self._download(target_url, target, hops + 1, keyed, deadline)
        return bytes(buf)

    def _auth(self) -> dict:
        """The Authorization header for Label Studio: `Token <key>` for a legacy key; for a personal access token
        `Bearer <access token>`, exchanged at /api/token/refresh/ and renewed before it lapses, as label-studio-sdk
        does for the API (Label Studio refuses the personal token itself, and a legacy key where the organization
        turned legacy tokens off, its default)."""
        if not personal_token(self.token):
            return {"Authorization": f"Token {self.token}"}
        with _access_lock:
            access, renew_at = _access.get(self._access_key(), ("", 0.0))
            if not access or time.monotonic() >= renew_at:
                access, lifetime = self._exchange()
                _access[self._access_key()] = access, time.monotonic() + max(10.0, 0.8 * lifetime)
        return {"Authorization": f"Bearer {access}"}

    def _exchange(self) -> tuple[str, float]:
        """(access token, its lifetime in seconds) for the personal token."""
        url = f"{self.ls_url}/api/token/refresh/"
        try:
            r = self.session.post(url, json={"refresh": self.token}, allow_redirects=False, verify=self.verify,
                                  timeout=(5.0, self.settings.fetch_timeout_s))
        except requests.RequestException as e:
            raise MediaError(f"could not reach {_redact(url)} to exchange the personal access token: "
                             f"{type(e).__name__}", retry=True) from None
        try:
            access = r.json().get("access") if r.status_code == 200 else None
        except (ValueError, AttributeError):
            access = None
        if not isinstance(access, str):
            raise MediaError(f"Label Studio refused LABEL_STUDIO_API_KEY, a personal access token (HTTP "
                             f"{r.status_code}): it was revoked or has expired, or personal access tokens are off "
                             "for the organization", retry=True)
        claims = _claims(access)
        try:
            lifetime = float(claims["exp"]) - float(claims["iat"])
        except (KeyError, TypeError, ValueError):
            lifetime = 60.0
        return access, lifetime

    def _access_key(self) -> tuple[str, str]:
        return self.ls_url, hashlib.sha256(self.token.encode()).hexdigest()

    def _forget_access(self) -> None:
        with _access_lock:
            _access.pop(self._access_key(), None)

    # ------------------------------------------------------------------------------------------ pixels
    def load_image(self, ref: str, task_id: Any = None) -> np.ndarray:
        """Image reference -> (H, W, 3) uint8 RGB at full size. Raises MediaError for anything unusable."""
        return decode_image(self.fetch(ref, task_id), self.settings.max_pixels, _redact(ref))[0]

    def load_working(self, ref: str, task_id: Any = None) -> tuple[np.ndarray, tuple[int, int]]:
        """Image reference -> ((h, w, 3) uint8 RGB with max(h, w) <= TESSERA_MAX_SIDE, original (H, W))."""
        return decode_image(self.fetch(ref, task_id), self.settings.max_pixels, _redact(ref), self.settings.max_side)


class _PixelBudget:
    """Bounds the pixels of full-size decodes in flight in this process, so a request of many large images
    (or several requests) decodes them one by one instead of holding them all at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    @contextmanager
    def take(self, n: int):
        n = min(n, self.limit)
        with self.cond:
            self.cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


_DECODE_BUDGET = _PixelBudget(64_000_000)     # ~256 MB of decoded RGB(X) pixels at a time


def decode_image(data: bytes, max_pixels: int, name: str = "image",
                 max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> ((h, w, 3) uint8 RGB, original (H, W)), checking the pixel count from the header first.

    The image comes upright as Label Studio shows it: browsers apply a photo's EXIF orientation, so a phone
    photo stored sideways with orientation 6 is shown, annotated (percentages, original_width / height) and
    must be predicted as the turned image (ImageOps.exif_transpose; upstream backends had the same defect,
    label-studio-ml-backend#535).

    With `max_side`, the image is decoded straight to at most that many pixels on its longer side: JPEG in
    the DCT domain (`draft`), other formats by an integer box `reduce` then a bilinear resize, one full-size
    decode at a time per process."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise MediaError(f"{name} is {w}x{h} = {w * h} pixels, over the {max_pixels} pixel cap "
                                 "(TESSERA_MAX_PIXELS)")
            if w == 0 or h == 0:
                raise MediaError(f"{name} has no pixels")
            target = None
            if max_side and max(w, h) > max_side:
                scale = max_side / max(w, h)
                target = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
                im.draft("RGB", target)                                       # JPEG only; a no-op otherwise
            with _DECODE_BUDGET.take(im.size[0] * im.size[1]):
                im.load()
                out = im.resize(target, Image.BILINEAR, reducing_gap=2.0) if target else im
                # after load (a PNG may keep its EXIF after the pixels) and after the resize (less to turn)
                turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)    # shown as h x w
                ImageOps.exif_transpose(out, in_place=True)
            return image_to_rgb(out), ((w, h) if turned else (h, w))
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(f"{name} is not a readable image ({type(e).__name__}: {str(e)[:100]})") from None

