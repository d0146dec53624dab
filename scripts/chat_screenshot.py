"""Regenerate docs/chat.png: serve a run with `slm serve`, hold a short conversation in headless Chromium, save it.

    python scripts/chat_screenshot.py runs/smollm2-int8 --out docs/chat.png   # slm quantize runs/smollm2 first
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--weights", default="fp32", help="quantize in memory (int8, int4) unless the run already is")
    ap.add_argument("--out", default="docs/chat.png")
    ap.add_argument("--message", action="append",
                    default=None, help="user turns (default: two questions about Paris)")
    a = ap.parse_args()
    messages = a.message or ["What is the capital of France?", "Name two famous museums there."]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", a.run, "--weights", a.weights,
                               "--port", str(port), "--log-level", "warning"])
    try:
        for _ in range(600):
            if server.poll() is not None:
                sys.exit("slm serve exited: see its message above")
            try:
                urllib.request.urlopen(url + "/health")
                break
            except OSError:
                time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 820, "height": 700})
            page.goto(url)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "120")
            for text in messages:
                page.fill("#prompt", text)
                page.press("#prompt", "Enter")
                expect(page.locator("#messages")).to_have_attribute("aria-busy", "false", timeout=120_000)
            page.screenshot(path=a.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
