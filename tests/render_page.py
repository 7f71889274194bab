"""Render an HTML file in a headless Chromium (QtWebEngine from PyQt6-WebEngine, offscreen) and report what it saw.

Usage: ``python tests/render_page.py PAGE.html SHOT.png`` prints one JSON line: whether the page loaded, the
browser console messages, the screenshot's size, and DOM facts read in the page after layout (inline SVGs
and their rendered sizes, tables, details elements, images that failed to decode).  A separate process:
Qt wants its application on the main thread, once per process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox --disable-gpu --disable-dev-shm-usage")
os.environ.setdefault("QT_LOGGING_RULES", "*.debug=false;qt.*=false")

DOM_FACTS = """JSON.stringify({
  svgs: Array.from(document.querySelectorAll('svg')).map(s => [s.getBoundingClientRect().width,
                                                               s.getBoundingClientRect().height]),
  tables: document.querySelectorAll('table').length,
  details: document.querySelectorAll('details').length,
  broken_images: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
  height: document.body.scrollHeight
})"""


def main(page: str, shot: str) -> int:
    from PyQt6.QtCore import QSize, QTimer, QUrl
    from PyQt6.QtWebEngineCore import QWebEnginePage
    from PyQt6.QtWebEngineWidgets import QWebEngineView
    from PyQt6.QtWidgets import QApplication

    console: list[dict[str, object]] = []
    result: dict[str, object] = {"loaded": False}

    class Page(QWebEnginePage):
        def javaScriptConsoleMessage(self, level, message, line, source):  # noqa: ANN001, N802 - Qt's override
            console.append({"level": int(level.value), "message": message, "line": line})

    app = QApplication(sys.argv[:1])
    view = QWebEngineView()
    view.setPage(Page(view))
    view.resize(QSize(1100, 1600))

    def finish(facts: str) -> None:
        img = view.grab()
        img.save(shot)
        result.update(console=console, shot=[img.width(), img.height()], dom=json.loads(facts or "{}"))
        app.quit()

    def loaded(ok: bool) -> None:
        result["loaded"] = bool(ok)
        QTimer.singleShot(500, lambda: view.page().runJavaScript(DOM_FACTS, finish))

    view.loadFinished.connect(loaded)
    view.load(QUrl.fromLocalFile(str(Path(page).resolve())))
    view.show()
    QTimer.singleShot(60_000, app.quit)
    app.exec()
    print(json.dumps(result))
    return 0 if result.get("loaded") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
