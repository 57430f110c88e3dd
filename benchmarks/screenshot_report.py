"""Screenshot the HTML cost report of the sample job in headless Chromium.

    python benchmarks/screenshot_report.py [--out /tmp/batchrun-report.png] [--chromium PATH]

Runs the sample job twice into a temporary folder: "last night" on the
embedded endpoint (``batchrun run jobs/summarize_tickets.toml --mock``), and
"tonight" on ``batchrun mock-server --cached-share 0.4 --reasoning-tokens 12``
(a server that reports cached and reasoning tokens); writes tonight's report
(``--prices jobs/prices.toml --by priority --compare LAST --fail-if
'cost_per_row>+20%' --html``) and opens the page in headless Chromium (no
network, a throwaway profile) to save a 1280x2000 PNG, by default under /tmp:
screenshots stay out of the repository. Look at the PNG to check the page: the
cards (cached and reasoning shares, tiers), three charts, two tables, the
comparison and its check, nothing cut off or overlapping.

Chromium: ``apt-get update && apt-get install -y chromium`` (``/usr/bin/chromium``).
Exit 0 with the PNG's path on stdout; 1 when Chromium is missing or fails.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def find_chromium(given: str | None) -> str | None:
    """The Chromium binary: ``given``, else the first of the usual names on PATH."""
    if given:
        return given if Path(given).exists() else shutil.which(given)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def sample_report(folder: Path) -> Path:
    """Run the sample job twice (see the module docstring) and write tonight's
    HTML report, compared with last night's, in ``folder``."""
    last, tonight = folder / "last-night.parquet", folder / "tonight.parquet"
    page = folder / "report.html"
    batchrun = [sys.executable, "-m", "batchrun"]
    job = str(REPO / "jobs" / "summarize_tickets.toml")
    subprocess.run(
        [*batchrun, "run", job, "--mock", "-q", "--output", str(last)], check=True, timeout=300
    )
    ready = folder / "mock-server.url"
    server = subprocess.Popen(
        [
            *batchrun,
            "mock-server",
            "--port",
            "0",
            "--cached-share",
            "0.4",
            "--reasoning-tokens",
            "12",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if ready.exists() and ready.read_text().strip():
                break
            time.sleep(0.1)
        base_url = ready.read_text().strip()
        subprocess.run(
            [
                *batchrun,
                "run",
                job,
                "-q",
                "--output",
                str(tonight),
                "--base-url",
                base_url,
                "--api-key-env",
                "",
            ],
            check=True,
            timeout=300,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    subprocess.run(
        [
            *batchrun,
            "report",
            str(tonight),
            "--prices",
            str(REPO / "jobs" / "prices.toml"),
            "--by",
            "priority",
            "--compare",
            str(last),
            "--fail-if",
            "cost_per_row>+20%",
            "--html",
            str(page),
        ],
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
    )
    return page


def screenshot(chromium: str, page: Path, png: Path, width: int = 1280, height: int = 2000) -> None:
    """Save a ``width`` x ``height`` pixel PNG of ``page`` with headless Chromium."""
    with tempfile.TemporaryDirectory(prefix="batchrun-chromium-") as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                f"--window-size={width},{height}",
                page.resolve().as_uri(),
            ],
            check=True,
            timeout=120,
            capture_output=True,
        )
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot at {png}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/batchrun-report.png"))
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: on PATH)")
    parser.add_argument("--html", type=Path, default=None, help="Screenshot this page instead")
    args = parser.parse_args()
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(
            "Chromium not found: apt-get update && apt-get install -y chromium (or --chromium PATH).",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="batchrun-report-") as tmp:
        page = args.html or sample_report(Path(tmp))
        try:
            screenshot(chromium, page, args.out)
        except (subprocess.SubprocessError, RuntimeError) as exc:
            print(f"Screenshot failed: {exc}", file=sys.stderr)
            return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
