"""Screenshot of Label Studio's labelling view showing Tessera's predictions on a demo task.

Drives Debian's chromium (never a downloaded browser) with playwright: logs in with the demo's
username and password, opens a demo task in the labelling view, waits until the prediction's regions are
listed in the Regions panel and drawn, checks that they are there and saves a PNG (< 1 MB).

    apt-get install -y chromium                 # if /usr/bin/chromium is missing
    .venv/bin/pip install playwright            # the python package only: no `playwright install`
    .venv/bin/python -m bench.screenshot --start --data-dir .demo --out docs/screenshot.png

--start runs `tessera demo --data-dir D` in the background, waits for it to be ready, takes the
screenshot and stops the demo (Ctrl-C semantics: both servers stop, the data stays). Without --start
the demo must already be running on that data dir (its demo.json tells the URL and login).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tessera.backend import lsclient

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
MAX_BYTES = 1_000_000
# regions of the annotation shown in the editor (LS exposes its editor store as window.Htx); -1 if absent
STORE_REGIONS_JS = """() => {
  const store = window.Htx && window.Htx.annotationStore;
  const shown = store && store.selected;
  return shown ? shown.regionStore.regions.length : -1;
}"""


def read_summary(data_dir: Path) -> dict:
    path = data_dir / "demo.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `tessera demo --data-dir {data_dir}` first (or pass --start)")
    return json.loads(path.read_text())


def start_demo(data_dir: Path, quick: bool, timeout: float) -> subprocess.Popen:
    """`tessera demo` in the background; returns once its demo.json says it is ready and running."""
    exe = Path(sys.executable).with_name("tessera")
    cmd = [str(exe), "demo", "--data-dir", str(data_dir)] + (["--quick"] if quick else [])
    log = open(data_dir.parent / f"{data_dir.name}-screenshot-demo.log", "w")
    print(f"starting {' '.join(cmd)} (log {log.name})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited with code {proc.returncode}; see {log.name}")
        try:
            summary = json.loads((data_dir / "demo.json").read_text())
        except (OSError, ValueError):
            summary = {}
        if summary.get("pid") == proc.pid and summary.get("ready") and summary.get("running"):
            return proc
        time.sleep(2)
    stop_demo(proc)
    raise SystemExit(f"the demo was not ready after {timeout:.0f} s; see {log.name}")


def stop_demo(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)       # the demo stops both servers and keeps the data
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def pick_task(summary: dict, wanted: int | None) -> tuple[int, int]:
    """(task id, regions in its Tessera prediction): the given task, else the unannotated real task whose
    prediction has the most regions (a full picture), capped so the sidebar stays readable."""
    ls, pid = summary["label_studio"], summary["project"]["id"]
    tasks = list(lsclient.tasks(lsclient.connect(ls["api_url"], ls["token"]), pid))
    version = summary["model"]["version"]

    def regions(t: dict) -> int:
        return max((len(p["result"]) for p in t.get("predictions") or [] if p.get("model_version") == version),
                   default=0)

    if wanted is not None:
        task = next((t for t in tasks if t["id"] == wanted), None)
        if task is None:
            raise SystemExit(f"task {wanted} is not in project {pid}")
        return wanted, regions(task)
    candidates = [t for t in tasks if not t.get("annotations") and not (t.get("meta") or {}).get("synthetic")
                  and 0 < regions(t) <= 60]
    if not candidates:
        raise SystemExit(f"no unannotated task of project {pid} has a prediction of {version} with regions")
    best = max(candidates, key=lambda t: (regions(t), -t["id"]))
    return best["id"], regions(best)


def screenshot(summary: dict, task: int, n_regions: int, out: Path, width: int, height: int,
               timeout_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    ls, pid = summary["label_studio"], summary["project"]["id"]
    base = ls["api_url"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.set_default_timeout(timeout_s * 1000)
            page.goto(f"{base}/user/login/")
            page.fill("input[name=email]", ls["username"])
            page.fill("input[name=password]", ls["password"])
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)
            page.goto(f"{base}/projects/{pid}/data?task={task}")
            # the Regions panel lists the shown prediction's regions (a virtual list: only the visible
            # rows are in the DOM); the editor's store holds all of them
            page.wait_for_selector(".lsf-outliner-item")
            page.wait_for_selector(".lsf-image canvas, .lsf-object canvas")
            deadline = time.monotonic() + timeout_s
            in_store = -1
            while time.monotonic() < deadline:
                in_store = page.evaluate(STORE_REGIONS_JS)
                if in_store >= n_regions:
                    break
                time.sleep(0.5)
            time.sleep(2)                       # let the canvas finish drawing masks and polygons
            listed = page.locator(".lsf-outliner-item").count()
            tabs = page.locator(".lsf-annotation-button").all_inner_texts()
            assert listed >= 1, "no region is listed in the labelling view"
            assert in_store in (-1, n_regions), f"the editor holds {in_store} regions, the prediction has {n_regions}"
            assert any("tessera-" in t for t in tabs), f"no Tessera prediction tab in {tabs}"
            png = page.screenshot(full_page=False)
        finally:
            browser.close()
    data = shrink(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return {"task": task, "regions_listed": listed, "regions_in_editor": in_store, "prediction_regions": n_regions,
            "bytes": len(data),
            "tabs": [" ".join(t.split()) for t in tabs]}


def shrink(png: bytes) -> bytes:
    """Keep the PNG under MAX_BYTES: re-encode, then fall back to a 256-colour palette."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        buf = io.BytesIO()
        im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, format="PNG",
                                                                                           optimize=True)
    assert buf.tell() <= MAX_BYTES, f"screenshot is {buf.tell()} bytes even as a palette PNG"
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=".demo", help="the demo's data dir (holds demo.json)")
    ap.add_argument("--out", default="docs/screenshot.png")
    ap.add_argument("--task", type=int, default=None, help="task id (default: the unannotated task with the "
                                                           "most predicted regions)")
    ap.add_argument("--start", action="store_true", help="start `tessera demo` in the background and stop it after")
    ap.add_argument("--quick", action="store_true", help="with --start: the quick demo")
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the page to render")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found: apt-get install -y chromium")
    data_dir = Path(args.data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = start_demo(data_dir, args.quick, timeout=900) if args.start else None
    try:
        summary = read_summary(data_dir)
        if not summary.get("running"):
            raise SystemExit(f"the demo in {data_dir} is not running: start it (or pass --start)")
        task, n_regions = pick_task(summary, args.task)
        result = screenshot(summary, task, n_regions, Path(args.out), args.width, args.height, args.timeout)
    finally:
        if proc is not None:
            stop_demo(proc)
    print(json.dumps({"out": args.out, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
