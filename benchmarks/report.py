"""The listening report and the quality-against-bitrate plot of ``bench_quality.py``.

:func:`excerpt` turns one excerpt's signals (the original and every codec's reconstruction, each at
its own sample rate) into players and pictures at once: lossless FLAC (16-bit, the codec's own
rate) and a mel spectrogram PNG, all rows of an excerpt on one mel axis (up to the highest rate's
Nyquist frequency, so a lower-rate codec's missing band shows as empty) and one colour scale.
:func:`page` joins metric tables, the plot and excerpts into one self-contained HTML page (data:
URLs only, no script); every string it is given is escaped. :func:`quality_plot` draws metrics
against kbps from bench_quality's JSON. matplotlib draws the pictures and transformers gives the mel
filter bank (both in the ``eval`` extra).
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
import torch

#: STFT window in seconds (2048 samples at 48 kHz): the same frequency resolution at every rate.
WINDOW_SECONDS = 2048 / 48000
N_MELS = 128
#: Colour range below an excerpt's loudest mel bin.
DYNAMIC_RANGE_DB = 80.0
#: Frequencies labelled on a spectrogram's axis.
TICKS_HZ = (0, 500, 1000, 2000, 4000, 8000, 16000)
#: Bitrates (kbps) labelled on the plot's logarithmic axis.
TICKS_KBPS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
#: (category in the JSON, metric) per panel of :func:`quality_plot`; "all": the pooled rows, or the
#: only category run.
PANELS = (("all", "mel_distance"), ("all", "visqol"), ("speech", "pesq"), ("speech", "visqol_speech"))


@dataclass
class Signal:
    """One row of an excerpt before coding for the page: ``audio`` is ``[1, N]`` at ``sample_rate``."""

    label: str
    sample_rate: int
    audio: np.ndarray
    caption: str = ""


@dataclass
class Clip:
    """One row of an excerpt on the page: its audio as FLAC and its mel spectrogram as PNG."""

    label: str
    caption: str
    sample_rate: int
    flac: bytes
    png: bytes


@dataclass
class Excerpt:
    """The rows of one excerpt of one category (``key``: the file it was cut from)."""

    category: str
    key: str
    clips: list[Clip]


@dataclass
class Table:
    """A metric table: ``head`` and ``body`` cells are plain text; ``notes`` follow the table."""

    title: str
    head: list[str]
    body: list[list[str]]
    notes: list[str] = field(default_factory=list)


# -- pictures and sound ------------------------------------------------------------------------


def flac_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """``[1, N]`` float audio as a 16-bit mono FLAC file (clipped to [-1, 1])."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.reshape(-1), -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def mel_db(audio: np.ndarray, sample_rate: int, top_hz: float) -> np.ndarray:
    """Mel spectrogram in dB, ``[N_MELS, frames]``: magnitude STFT (Hann window of WINDOW_SECONDS,
    hop a quarter of it) divided by the window's sum, so the values do not depend on the rate, and
    Slaney mel bands from 0 to ``top_hz`` (bands above the Nyquist frequency stay empty)."""
    from transformers.audio_utils import mel_filter_bank

    n_fft = 2 * round(WINDOW_SECONDS * sample_rate / 2)
    window = torch.hann_window(n_fft, dtype=torch.float64)
    x = torch.from_numpy(np.asarray(audio, dtype=np.float64).reshape(-1))
    spec = torch.stft(x, n_fft, n_fft // 4, window=window, center=True, return_complex=True).abs() / window.sum()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        filters = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0,
                                  max_frequency=top_hz, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
    mel = filters.T @ spec.numpy()
    return 20 * np.log10(np.maximum(mel, 1e-10))


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes with a 256-colour palette (a third of the RGBA file's size)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    out = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(256).save(out, format="PNG", optimize=True)
    return out.getvalue()


def spectrogram_png(db: np.ndarray, seconds: float, top_hz: float, vmin: float, vmax: float) -> bytes:
    """A mel spectrogram (``mel_db``'s output) as a small PNG with time (s) and frequency (Hz) axes."""
    from matplotlib.figure import Figure
    from transformers.audio_utils import hertz_to_mel

    fig = Figure(figsize=(6.4, 1.35), dpi=72, layout="constrained")
    ax = fig.subplots()
    top_mel = float(hertz_to_mel(top_hz, mel_scale="slaney"))
    ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest",
              extent=(0.0, seconds, 0.0, top_mel))
    ticks = [f for f in TICKS_HZ if f <= top_hz]
    ax.set_yticks([float(hertz_to_mel(f, mel_scale="slaney")) for f in ticks],
                  [f"{f / 1000:g}k" if f else "0" for f in ticks])
    ax.tick_params(labelsize=7, length=2, pad=1)
    ax.set_xlabel("s", fontsize=7, labelpad=0)
    return figure_png(fig)


def excerpt(category: str, key: str, signals: Sequence[Signal]) -> Excerpt:
    """One excerpt's clips: every signal as FLAC at its own rate, and its mel spectrogram on a
    common frequency axis (up to the highest rate's Nyquist frequency) and colour scale (the
    loudest bin of any row down to DYNAMIC_RANGE_DB below it)."""
    top_hz = max(s.sample_rate for s in signals) / 2
    mels = [mel_db(s.audio, s.sample_rate, top_hz) for s in signals]
    vmax = max(float(m.max()) for m in mels)
    clips = [Clip(s.label, s.caption, s.sample_rate, flac_bytes(s.audio, s.sample_rate),
                  spectrogram_png(m, s.audio.shape[-1] / s.sample_rate, top_hz, vmax - DYNAMIC_RANGE_DB, vmax))
             for s, m in zip(signals, mels)]
    return Excerpt(category, key, clips)


def plot_rows(payload: dict[str, Any], category: str) -> list[dict[str, Any]]:
    """The summary rows of ``category`` in bench_quality's JSON; "all": the pooled rows, or those of
    the only category run. Empty when absent."""
    if category == "all" and "all" not in payload and len(payload["categories"]) == 1:
        category = next(iter(payload["categories"]))
    found = payload.get("all") if category == "all" else payload["categories"].get(category)
    return found["rows"] if found else []


def quality_plot(payload: dict[str, Any], titles: dict[str, str]) -> bytes:
    """PNG of metric means against kbps, one panel per :data:`PANELS` entry the JSON has values
    for: one line per codec (a model: its numbers of codebooks, each point labelled; Opus: its
    bitrates). ``titles``: metric name -> axis title. Raises ``ValueError`` when nothing is there."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    panels = [(c, m, plot_rows(payload, c)) for c, m in PANELS]
    panels = [(c, m, rows) for c, m, rows in panels if any(r.get(m, {}).get("mean") is not None for r in rows)]
    if not panels:
        raise ValueError("no metric values to plot")
    columns = min(2, len(panels))
    fig = Figure(figsize=(4.2 * columns, 3.0 * ((len(panels) + 1) // 2)), dpi=80, layout="constrained")
    axes = fig.subplots((len(panels) + 1) // 2, columns, squeeze=False).ravel()
    for ax, (category, metric, rows) in zip(axes, panels):
        codecs = list(dict.fromkeys(r["codec"] for r in rows))
        for codec in codecs:
            points = sorted((r["kbps"], r[metric]["mean"], r["codebooks"]) for r in rows
                            if r["codec"] == codec and r[metric]["mean"] is not None)
            if not points:
                continue
            model = points[0][2] is not None
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if model else "s", markersize=4,
                    linestyle="-" if model else "--", label=codec)
            if model:
                for rate, value, k in points:
                    ax.annotate(str(k), (rate, value), textcoords="offset points", xytext=(0, 4), fontsize=6,
                                ha="center")
        ax.set_xscale("log")
        low, high = min(r["kbps"] for r in rows), max(r["kbps"] for r in rows)
        ticks = [t for t in TICKS_KBPS if low / 1.5 <= t <= high * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("kbps", fontsize=8)
        ax.set_title(f"{category}: {titles.get(metric, metric)}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Means over files; numbers at a model's points: its codebooks", fontsize=8)
    return figure_png(fig)


# -- the page ----------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 72em; }
table { border-collapse: collapse; margin-bottom: 0.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; font-size: 0.9em; }
table.metrics td { text-align: right; }
table.metrics td:first-child { text-align: left; }
table.clips td { vertical-align: middle; }
table.clips img { display: block; }
.caption { color: #555; font-size: 0.85em; }
"""


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def tag(name: str, text: str, **attrs: str) -> str:
    """``<name attrs>text</name>`` with the text and attribute values escaped."""
    return f"<{name}{attributes(attrs)}>{html.escape(text)}</{name}>"


def attributes(attrs: dict[str, str]) -> str:
    return "".join(f' {k.rstrip("_")}="{html.escape(v, quote=True)}"' for k, v in attrs.items())


def table_html(table: Table) -> str:
    head = "".join(tag("th", cell) for cell in table.head)
    body = "".join("<tr>" + "".join(tag("td", cell) for cell in row) + "</tr>\n" for row in table.body)
    notes = "".join(tag("p", note, class_="caption") for note in table.notes)
    return (f'<table class="metrics">{tag("caption", table.title)}<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}</tbody></table>\n{notes}\n")


def clip_html(clip: Clip) -> str:
    audio = f'<audio controls preload="auto"{attributes({"src": data_url("audio/flac", clip.flac)})}></audio>'
    image = f'<img{attributes({"src": data_url("image/png", clip.png), "alt": f"mel spectrogram: {clip.label}"})}>'
    return (f"<tr><td>{tag('b', clip.label)}<br>{tag('span', clip.caption, class_='caption')}</td>"
            f"<td>{audio}</td><td>{image}</td></tr>\n")


def excerpt_html(item: Excerpt) -> str:
    rows = "".join(clip_html(clip) for clip in item.clips)
    return (f'<section class="excerpt">{tag("h3", f"{item.category}: {item.key}")}\n'
            f'<table class="clips">\n{rows}</table></section>\n')


def page(title: str, notes: Sequence[str], tables: Sequence[Table], excerpts: Sequence[Excerpt],
         plot: bytes | None = None, excerpt_notes: Sequence[str] = ()) -> str:
    """The whole page: title and notes, the metric tables, the plot (PNG, if any), then each
    excerpt's players and spectrograms. Every string is escaped."""
    parts = ["<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">", tag("title", title),
             f"<style>{STYLE}</style></head><body>\n", tag("h1", title), "\n"]
    parts += [tag("p", note) + "\n" for note in notes]
    parts += ["<h2>Metrics</h2>\n"] + [table_html(t) for t in tables]
    if plot is not None:
        parts.append("<h2>Quality against bitrate</h2>\n"
                     f'<img{attributes({"src": data_url("image/png", plot), "alt": "quality against bitrate"})}>\n')
    parts.append("<h2>Listening</h2>\n")
    parts += [tag("p", note, class_="caption") + "\n" for note in excerpt_notes]
    parts += [excerpt_html(e) for e in excerpts]
    parts.append("</body></html>\n")
    return "".join(parts)
