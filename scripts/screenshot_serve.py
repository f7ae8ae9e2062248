"""Screenshot the live page of `potion serve` in headless Chromium (for docs/serve-page.png).

It starts `potion serve --model RUN` on a free loopback port, types the prompt into the page, waits for the
explanation, optionally generates a continuation, and saves the whole page.

    python scripts/screenshot_serve.py RUN docs/serve-page.png --prompt "ROMEO:" --generate 120

Needs the playwright Python package and a Chromium (default /usr/bin/chromium). Nothing is fetched from the
network: the page talks to the local server only.
"""

import argparse
import re
import subprocess
import sys

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
READY = re.compile(r"at (http://127\.0\.0\.1:\d+)/")


def start_server(run: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "potion", "serve", "--model", run, "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if m := READY.search(line):
            return server, m.group(1)
        sys.stderr.write(line)
    raise SystemExit("potion serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run directory (or Hugging Face folder) to serve")
    parser.add_argument("png")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--generate", type=int, default=0, metavar="TOKENS", help="generate this many tokens first")
    parser.add_argument("--temperature", default="0.8")
    parser.add_argument("--head", metavar="LAYER,HEAD", help="pick this head in the grid (default: the page's)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    server, url = start_server(args.run)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(url + "/")
            page.fill("#prompt", args.prompt)
            page.wait_for_function("(p) => document.body.dataset.prompt === p", arg=args.prompt, timeout=60_000)
            if args.head:
                layer, head = args.head.split(",")
                page.click(f"#grid .cell[data-layer='{layer}'][data-head='{head}']")
            if args.generate:
                page.fill("#max-tokens", str(args.generate))
                page.fill("#temperature", args.temperature)
                page.click("#generate")
                page.wait_for_function("() => document.getElementById('generate').textContent === 'Generate'")
            page.wait_for_timeout(3500)  # one poll of the run's training state
            page.screenshot(path=args.png, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait()
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
