"""Audio that libsndfile does not read (m4a/AAC), decoded with FFmpeg through PyAV (the ffmpeg extra)."""

import sys

import numpy as np
import pytest

from audiotok.audio import load_audio, read_audio_bytes

av = pytest.importorskip("av")


def write_m4a(path, seconds=0.5, rate=16000, freq=440.0):
    """A mono AAC tone in an MP4 (m4a) container, encoded with PyAV."""
    tone = (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return tone


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def test_m4a_files_and_bytes_decode(tmp_path):
    tone = write_m4a(tmp_path / "tone.m4a")
    audio, rate = load_audio(tmp_path / "tone.m4a")
    assert rate == 16000 and audio.shape[0] == 1 and audio.dtype == np.float32
    assert abs(audio.shape[1] - len(tone)) <= 2048  # AAC works in 1024-sample frames
    assert dominant_frequency(audio[0], rate) == pytest.approx(440, abs=5)
    from_bytes, rate = read_audio_bytes((tmp_path / "tone.m4a").read_bytes())  # webdataset / datasets bytes
    np.testing.assert_array_equal(from_bytes, audio)
    (tmp_path / "broken.m4a").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="broken.m4a: cannot read audio file"):
        load_audio(tmp_path / "broken.m4a")


def test_without_pyav_the_error_says_what_to_install(tmp_path, monkeypatch):
    write_m4a(tmp_path / "tone.m4a")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ValueError, match=r"tone.m4a: .*pip install 'audiotok\[ffmpeg\]'"):
        load_audio(tmp_path / "tone.m4a")
    with pytest.raises(ValueError, match=r"pip install 'audiotok\[ffmpeg\]'"):
        read_audio_bytes((tmp_path / "tone.m4a").read_bytes())


def test_m4a_files_in_folders_are_listed_and_encoded(tmp_path, tiny_tokenizer):
    from audiotok.cli.files import encode_path
    from audiotok.data.sources import AudioFolderSource

    (tmp_path / "in").mkdir()
    write_m4a(tmp_path / "in" / "tone.m4a")
    report = encode_path(tiny_tokenizer, tmp_path / "in", tmp_path / "out", progress=False)
    assert report.ok and [dst.name for _, dst in report.done] == ["tone.atok"]
    source = AudioFolderSource(tmp_path / "in")
    assert len(source) == 1 and source.clip(0).read(0, 100).shape == (1, 100)
