#!/usr/bin/env python3
"""Checks the internal links of the built book (mdbook's HTML output).

Usage: scripts/check-book-links.py docs/book

Every relative `href`/`src` in every page must name a file of the built book, and a `#fragment`
must name an `id` on the page it points to. External links (`http:`, `https:`, `mailto:`) are not
followed: CI has no network. Exits 1, listing each broken link with the page it is on.
Standard library only.
"""

import os
import sys
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

# Pages mdbook generates itself: their links are mdbook's business, not the book's.
GENERATED = {"print.html", "toc.html", "404.html"}


class Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links = []
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif name in ("href", "src") and tag in ("a", "img", "link", "script"):
                self.links.append(value)


def parse(path):
    page = Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    return page


def main(root):
    if not os.path.isfile(os.path.join(root, "index.html")):
        print(f"{root} holds no built book (no index.html): run `mdbook build docs` first")
        return 1
    pages = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".html"):
                path = os.path.normpath(os.path.join(dirpath, name))
                pages[path] = parse(path)
    broken = []
    checked = 0
    for path, page in sorted(pages.items()):
        if os.path.relpath(path, root) in GENERATED:
            continue
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                continue
            checked += 1
            target = path
            if parts.path:
                target = os.path.normpath(
                    os.path.join(os.path.dirname(path), unquote(parts.path))
                )
                if os.path.isdir(target):
                    target = os.path.join(target, "index.html")
                if not os.path.exists(target):
                    broken.append((path, link, "no such file"))
                    continue
            if parts.fragment and target.endswith(".html"):
                ids = pages[target].ids if target in pages else parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append((path, link, f"no id `{parts.fragment}` on that page"))
    for path, link, why in broken:
        print(f"{os.path.relpath(path, root)}: broken link `{link}`: {why}")
    print(f"book links: {checked} internal links checked, {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2])
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
