"""Resolve a task's image reference to pixels, treating every URL as hostile.

Accepted: LS-relative paths (`/data/upload/...`, `/tasks/.../resolve/...`) fetched from Label Studio with
its legacy token; http(s) URLs on allow-listed hosts (by default only Label Studio's own); `data:` URIs;
LS local-files URLs and plain paths under TESSERA_MEDIA_ROOT. Caps on bytes and pixels; no redirects
followed; no path escapes the media root; the token is only ever sent to the Label Studio host.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import numpy as np
import requests
from PIL import Image, UnidentifiedImageError

from backend.settings import Settings, host_of
from model.data import image_to_rgb

logger = logging.getLogger(__name__)


class MediaError(ValueError):
    """An image reference that cannot or may not be loaded; the message says why (never the token)."""


def _redact(url: str, limit: int = 120) -> str:
    """A URL for logs and errors: no query string (presigned URLs carry credentials), no userinfo."""
    if url.startswith("data:"):
        return url[:30] + "..."
    p = urlparse(url)
    shown = f"{p.scheme + '://' if p.scheme else ''}{host_of(url) if p.netloc else ''}{p.path}"
    return shown[:limit] + ("?..." if p.query else "")


class MediaResolver:
    """Fetch images for tasks. One per request context: `ls_url`/`token` come from /setup or settings."""

    def __init__(self, settings: Settings, ls_url: str = "", token: str = "", cache_dir: Path | None = None,
                 session: requests.Session | None = None):
        self.settings = settings
        self.ls_url = (settings.label_studio_url or ls_url or "").rstrip("/")
        self.token = settings.label_studio_api_key or token or ""
        self.ls_hosts = {host_of(u) for u in (settings.label_studio_url, ls_url) if u}
        self.allowed = set(settings.allowed_hosts) | self.ls_hosts
        self.cache_dir = cache_dir
        self.session = session or _pooled_session(settings.fetch_threads)

    # ------------------------------------------------------------------------------------------- bytes
    def fetch(self, ref: str) -> bytes:
        """Image reference -> raw bytes, within the byte cap. Raises MediaError."""
        if not isinstance(ref, str) or not ref.strip():
            raise MediaError("the task has no image reference (empty or not a string)")
        ref = ref.strip()
        if ref.startswith("data:"):
            return self._data_uri(ref)
        parsed = urlparse(ref)
        if parsed.path.startswith("/data/local-files") and "d" in parse_qs(parsed.query):
            return self._local(parse_qs(parsed.query)["d"][0])
        if parsed.scheme in ("http", "https"):
            return self._http(ref)
        if parsed.scheme in ("s3", "gs", "azure-blob", "azure-spi"):
            raise MediaError(f"{parsed.scheme}:// URLs are resolved by Label Studio's cloud storage; "
                             "connect the storage in LS so tasks carry resolvable URLs")
        if parsed.scheme:
            raise MediaError(f"unsupported URL scheme {parsed.scheme!r} in {_redact(ref)}")
        if ref.startswith("/data/") or ref.startswith("/tasks/") or ref.startswith("/storage-data/"):
            if not self.ls_url:
                raise MediaError(f"{_redact(ref)} is a Label Studio path but the Label Studio URL is unknown: "
                                 "set LABEL_STUDIO_URL (or connect the backend so /setup sends it)")
            return self._http(urljoin(self.ls_url + "/", ref.lstrip("/")))
        return self._local(ref)

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
                             "under one directory")
        rel = Path(unquote(path))
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
        host = host_of(url)
        hostname = urlparse(url).hostname or ""
        if "*" not in self.allowed and host not in self.allowed and hostname not in self.allowed:
            raise MediaError(f"host {host!r} is not allowed for media ({_redact(url)}); add it to "
                             "TESSERA_ALLOWED_HOSTS if it is trusted")
        cached = self._cache_path(url)
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        headers = {"Authorization": f"Token {self.token}"} if self.token and host in self.ls_hosts else {}
        cap = self.settings.max_image_bytes
        try:
            with self.session.get(url, headers=headers, stream=True, timeout=(5, 60), allow_redirects=False) as r:
                if 300 <= r.status_code < 400:
                    raise MediaError(f"{_redact(url)} redirects (HTTP {r.status_code}); redirects are not followed")
                if r.status_code != 200:
                    raise MediaError(f"{_redact(url)} answered HTTP {r.status_code}"
                                     + (" (check LABEL_STUDIO_API_KEY / legacy tokens)" if r.status_code in (
                                         401, 403) else ""))
                if int(r.headers.get("Content-Length") or 0) > cap:
                    raise MediaError(f"{_redact(url)} is over the {cap} byte cap")
                buf = bytearray()
                for chunk in r.iter_content(64 * 1024):
                    buf += chunk
                    if len(buf) > cap:
                        raise MediaError(f"{_redact(url)} is over the {cap} byte cap")
        except requests.RequestException as e:
            raise MediaError(f"could not download {_redact(url)}: {type(e).__name__}") from None
        data = bytes(buf)
        if cached is not None:
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, cached)
        return data

    def _cache_path(self, url: str) -> Path | None:
        if self.cache_dir is None:
            return None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir / hashlib.sha256(url.encode()).hexdigest()

    # ------------------------------------------------------------------------------------------ pixels
    def load_image(self, ref: str) -> np.ndarray:
        """Image reference -> (H, W, 3) uint8 RGB. Raises MediaError for anything unusable."""
        return decode_image(self.fetch(ref), self.settings.max_pixels, _redact(ref))


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, checking the pixel count from the header before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise MediaError(f"{name} is {w}x{h} = {w * h} pixels, over the {max_pixels} pixel cap "
                                 "(TESSERA_MAX_PIXELS)")
            if w == 0 or h == 0:
                raise MediaError(f"{name} has no pixels")
            im.draft("RGB", (w, h))
            return image_to_rgb(im)
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{name} is not a readable image ({type(e).__name__}: {str(e)[:100]})") from None


def _pooled_session(threads: int) -> requests.Session:
    """A Session whose connection pool holds one connection per fetch thread (requests' default of 10
    made urllib3 drop connections, with a "connection pool is full" warning each, at 16 threads)."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max(10, int(threads)))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session

