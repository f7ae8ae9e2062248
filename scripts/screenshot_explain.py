"""Screenshot a page written by `potion explain --html` in headless Chromium (for docs/explain-page.png).

The page may also come from Python: `from potion.explain import explain, save_html`.

    python scripts/screenshot_explain.py out.html docs/explain-page.png [--click TOKEN_INDEX]

Needs the playwright Python package and a Chromium (default /usr/bin/chromium). The page loads nothing from the
network, so this works offline too.
"""

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html")
    parser.add_argument("png")
    parser.add_argument("--click", type=int, help="click this token first (0-based) to show its attention")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        page.goto(Path(args.html).resolve().as_uri())
        if args.click is not None:
            page.click(f"#tokens .tok[data-i='{args.click}']")
            page.mouse.move(0, 0)
        page.screenshot(path=args.png, full_page=True)
        browser.close()
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
