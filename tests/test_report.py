"""The listening report of ``benchmarks/bench_quality.py --report``: its structure (parsed with the
standard library; always runs) and its audio players in headless Chromium (skipped without it).

One run of bench_quality on two tiny random models at different sample rates (and Opus when
opus-tools is installed) and three synthetic files, one named with markup in it."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import make_audio, random_tokenizer

from audiotok import DACConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quality  # noqa: E402
import plot_quality  # noqa: E402
import plot_training  # noqa: E402
import report  # noqa: E402

SCRIPT_NAME = "speech/<script>alert('x & y')</script>.wav"
MODEL_NAME = "m16<em>"  # a --model folder whose name is markup
SECONDS = 0.3  # excerpt length; the files are longer
#: Every tag the page may have; anything else came from an unescaped string.
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "caption", "thead",
        "tbody", "tr", "th", "td", "b", "br", "span", "section", "audio", "img"}
OPUS = shutil.which("opusenc") is not None and shutil.which("opusdec") is not None


@dataclass
class Page:
    """What :class:`PageParser` found: tags seen, metric tables (caption, rows of cell texts) and
    excerpts (heading, rows of (label, audio src, image src))."""

    tags: set[str] = field(default_factory=set)
    tables: list[tuple[str, list[list[str]]]] = field(default_factory=list)
    excerpts: list[tuple[str, list[tuple[str, str, str]]]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self.stack: list[tuple[str, dict[str, str | None]]] = []
        self.text = ""
        self.row: list[str] = []
        self.clip: dict[str, str] = {}

    def inside(self, name: str, class_: str | None = None) -> bool:
        return any(t == name and (class_ is None or a.get("class") == class_) for t, a in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.page.tags.add(tag)
        if tag == "table" and a.get("class") == "metrics":
            self.page.tables.append(("", []))
        elif tag == "section":
            self.page.excerpts.append(("", []))
        elif tag in ("audio", "img"):
            src = a.get("src") or ""
            self.page.images += [src] if tag == "img" else []
            if self.inside("table", "clips"):
                self.clip[tag] = src
        if tag not in ("meta", "img", "br"):
            self.stack.append((tag, a))
        self.text = ""

    def handle_data(self, data: str) -> None:
        self.text += data

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1][0] != tag:
            raise AssertionError(f"</{tag}> closes {self.stack[-1:]}")
        self.stack.pop()
        text = self.text.strip()
        if tag == "caption" and self.inside("table", "metrics"):
            self.page.tables[-1] = (text, self.page.tables[-1][1])
        elif tag == "td" and self.inside("table", "metrics"):
            self.row.append(text)
        elif tag == "tr" and self.inside("table", "metrics") and self.row:
            self.page.tables[-1][1].append(self.row)
            self.row = []
        elif tag == "h3" and self.inside("section"):
            self.page.excerpts[-1] = (text, self.page.excerpts[-1][1])
        elif tag == "b" and self.inside("table", "clips"):
            self.clip["label"] = text
        elif tag == "tr" and self.inside("table", "clips"):
            self.page.excerpts[-1][1].append((self.clip["label"], self.clip["audio"], self.clip["img"]))
            self.clip = {}
        self.text = ""


def check_png(src: str) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(decode(src, "image/png")))
    assert image.format == "PNG"
    image.verify()


def decode(src: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix):], validate=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bench_quality on the synthetic set with --report and --plot -> the paths of its outputs."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    files = [("speech", "speech/a.wav", 16000, 1), ("speech", SCRIPT_NAME, 22050, 1),
             ("music", "music/b.flac", 48000, 2)]
    for i, (_, path, rate, channels) in enumerate(files):
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(data / path, make_audio(int(0.5 * rate), channels, seed=i).T, rate)
    with open(data / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "category", "path"])
        writer.writerows(["eval", category, path] for category, path, _, _ in files)
    models = [root / "m44", root / MODEL_NAME]
    random_tokenizer("tiny-44khz").save_pretrained(models[0])
    random_tokenizer("tiny-16khz", seed=1).save_pretrained(models[1])
    out = {"html": root / "page.html", "png": root / "plot.png", "json": root / "q.json"}
    every = bench_quality.metric_functions
    with pytest.MonkeyPatch.context() as patch:  # two real metrics are enough here, and faster
        patch.setattr(bench_quality, "metric_functions", lambda *a: {
            k: v for k, v in every(*a).items() if k in ("mel_distance", "si_sdr")})
        code = bench_quality.main([
            "--model", *map(str, models), "--data", str(data), "--categories", "speech", "music",
            "--codebooks", "1", "4", "--opus", *(["6"] if OPUS else []), "--seconds", str(SECONDS),
            "--min-seconds", "0.1", "--device", "cpu",
            "--out", str(out["json"]), "--report", str(out["html"]), "--plot", str(out["png"])])
    assert code == 0
    return out


def parse(path: Path) -> Page:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.page


def expected_rows() -> list[tuple[str, str, str]]:
    """(codec, kbps, codebooks) of each table row: the two models at 1 and 4 codebooks, then Opus."""
    rows = []
    for name, preset in [("m44", "tiny-44khz"), (MODEL_NAME, "tiny-16khz")]:
        config = DACConfig.preset(preset)
        bits = config.sample_rate / math.prod(config.encoder_rates) * math.log2(config.codebook_size)
        rows += [(name, f"{k * bits / 1000:.2f}", str(k)) for k in (1, 4)]
    return rows + ([("opus", "6.00", "–")] if OPUS else [])


def test_report_structure(run: dict[str, Path]) -> None:
    page = parse(run["html"])
    assert page.tags <= TAGS, f"unescaped markup: {page.tags - TAGS}"

    # the metric tables: one per category and the pooled one, each with every codec row
    assert [caption.split(":")[0] for caption, _ in page.tables] == ["speech", "music", "all (speech + music)"]
    for _, rows in page.tables:
        assert [tuple(r[:3]) for r in rows] == expected_rows()

    # excerpts: 2 speech files (--report-excerpts 2) and the music file, markup in the name as text
    assert sorted(heading for heading, _ in page.excerpts) == sorted(
        ["speech: speech/a.wav", f"speech: {SCRIPT_NAME}", "music: music/b.flac"])
    labels = {f"m44@{k}" for k in (1, 4)} | {f"{MODEL_NAME}@{k}" for k in (1, 4)} | ({"opus@6kbps"} if OPUS else set())
    rates = {"original": 44100, "m44": 44100, MODEL_NAME: 16000, "opus": 44100}  # Opus: the first model's rate
    for _, clips in page.excerpts:
        assert clips[0][0] == "original" and {c[0] for c in clips[1:]} == labels and len(clips) == len(labels) + 1
        for label, audio, image in clips:
            y, rate = sf.read(io.BytesIO(decode(audio, "audio/flac")), dtype="float32")
            assert rate == rates[label.split("@")[0]]
            assert y.ndim == 1 and len(y) == round(SECONDS * rate)
            assert np.abs(y).max() > 0.01  # not silence (the random models decode to audible output)
            check_png(image)

    # images: the plot, then every clip's spectrogram (checked above)
    assert len(page.images) == sum(len(clips) for _, clips in page.excerpts) + 1
    check_png(page.images[0])


def test_report_plot(run: dict[str, Path], tmp_path: Path) -> None:
    """--plot writes the figure the page shows, and plot_quality.py redraws it from the JSON."""
    png = run["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 100_000
    assert decode(parse(run["html"]).images[0], "image/png") == png
    plot_quality.main([str(run["json"]), str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").read_bytes() == png
    with pytest.raises(ValueError, match="nothing|no metric"):
        report.quality_plot({"categories": {}}, {})


def test_training_plot(run: dict[str, Path], tmp_path: Path) -> None:
    """plot_training.py draws states from bench_quality JSON at their hours of audio seen (each model's
    fullest depth), names a missing row, and refuses files that measured other excerpts."""
    payload = json.loads(run["json"].read_text())
    rows = [r for r in payload["all"]["rows"] if r["codec"] == "m44"]
    assert {r["codebooks"] for r in rows} == {1, 4}
    full = next(r for r in rows if r["codebooks"] == 4)
    assert plot_training.mean(payload, "all", "si_sdr", "m44") == full["si_sdr"]["mean"]
    assert plot_training.mean(payload, "speech", "pesq", "m44") is None  # not measured here
    out = tmp_path / "training.png"
    plot_training.main([str(out), "--point", "1", str(run["json"]), "m44",
                        "--point", "2.5", str(run["json"]), MODEL_NAME])
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(SystemExit, match="has no row 'm9'; its rows: m16<em>, m44(, opus)?$"):
        plot_training.main([str(out), "--point", "1", str(run["json"]), "m9"])
    payload["categories"]["music"]["per_file"].pop()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(payload))
    with pytest.raises(SystemExit, match="different excerpts"):
        plot_training.main([str(out), "--point", "1", str(run["json"]), "m44", "--point", "2", str(other), "m44"])


def test_spectrograms_share_one_scale() -> None:
    """A tone at two sample rates gives the same mel values on the common axis; the lower rate's
    bands above its Nyquist frequency are empty."""
    t16, t44 = np.arange(16000) / 16000, np.arange(44100) / 44100
    low = report.mel_db(0.5 * np.sin(2 * np.pi * 1000 * t16)[None], 16000, 22050.0)
    high = report.mel_db(0.5 * np.sin(2 * np.pi * 1000 * t44)[None], 44100, 22050.0)
    peak = int(high[:, 10:-10].mean(1).argmax())
    assert low[:, 10:-10].mean(1).argmax() == peak
    assert abs(low[peak, 10:-10].mean() - high[peak, 10:-10].mean()) < 0.5
    assert low[-20:].max() <= -190 and high[-20:].max() > -190


# -- in a browser ------------------------------------------------------------------------------

#: Waits until every <audio> can play through (or fails), plays each for a moment, and returns
#: its state: readyState, duration, error code, and currentTime after play() (or play()'s error).
AUDIO_STATES = """(async () => {
  const audios = [...document.querySelectorAll('audio')];
  await Promise.all(audios.map(a => a.readyState >= 4 || a.error ? null : new Promise(r => {
    a.addEventListener('canplaythrough', r); a.addEventListener('error', r); })));
  const played = await Promise.all(audios.map(a => a.play().then(() => new Promise(r => {
    const t = setTimeout(() => r(a.currentTime), 5000);
    a.addEventListener('timeupdate', () => {
      if (a.currentTime > 0) { clearTimeout(t); a.pause(); r(a.currentTime); } });
  }), e => String(e))));
  return audios.map((a, i) => ({readyState: a.readyState, duration: a.duration,
                                error: a.error && a.error.code, played: played[i]}));
})()"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-terminated JSON messages on fds 3 and 4), standard library only."""

    def __init__(self, exe: str, profile: Path, timeout: float = 60.0):
        # sh moves our stdin/stdout pipes to the fds 3 and 4 Chromium talks on.
        self.proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', exe, "--headless", "--no-sandbox",
             "--disable-gpu", "--remote-debugging-pipe", "--autoplay-policy=no-user-gesture-required",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.deadline = time.monotonic() + timeout
        self.ids = 0
        self.buffer = b""

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.ids += 1
        message: dict[str, Any] = {"id": self.ids, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        while (answer := self.read()).get("id") != self.ids:
            pass
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def audio_states(self, page: Path) -> list[dict[str, Any]]:
        """Open ``page`` in a new tab, wait for its load event, and run :data:`AUDIO_STATES`."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=session)
        self.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        while self.read().get("method") != "Page.loadEventFired":
            pass
        result = self.call("Runtime.evaluate", {"expression": AUDIO_STATES, "awaitPromise": True,
                                                "returnByValue": True}, session=session)
        return result["result"]["value"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # Chromium exits when its pipe closes
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_report_plays_in_chromium(run: dict[str, Path], tmp_path: Path) -> None:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no chromium (apt-get install chromium)")
    bad = tmp_path / "bad.html"  # the check itself: a player whose data is not audio must fail it
    bad.write_text('<audio controls preload="auto" src="data:audio/flac;base64,AAAA"></audio>')
    browser = Chromium(exe, tmp_path / "profile")
    try:
        states = browser.audio_states(run["html"])
        broken = browser.audio_states(bad)
    finally:
        browser.close()
    clips = sum(len(clips) for _, clips in parse(run["html"]).excerpts)
    assert len(states) == clips
    for state in states:
        assert state["error"] is None and state["readyState"] == 4, state
        assert state["duration"] == pytest.approx(SECONDS, abs=0.01), state
        assert isinstance(state["played"], (int, float)) and state["played"] > 0, state
    assert broken[0]["error"] is not None and broken[0]["readyState"] == 0
