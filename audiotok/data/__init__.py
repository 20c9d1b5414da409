"""Training data: audio sources, DAC-style excerpt processing, mixed resumable excerpt streams.

Needs the ``data`` extra for Hugging Face / WebDataset sources (``datasets``, ``webdataset``)
plus ``pyloudnorm`` and ``scipy`` for loudness and phase processing.
"""

from .config import MANIFEST_GROUPS, DataConfig, GroupConfig, build_sources, read_manifest, sources_from_manifest
from .dataset import PAPER_GROUP_WEIGHTS, Excerpt, ExcerptDataset, SourceGroup, build_validation_set, mixture
from .resident import ResidentAudio, ResidentBatches
from .sources import (
    AUDIO_EXTENSIONS,
    AudioFileSource,
    AudioFolderSource,
    AudioSource,
    DecodeError,
    FileClip,
    HFDatasetSource,
    Record,
    SkipCounter,
    URLFolderSource,
    WebDatasetSource,
    decode_bytes,
    decode_file,
    expand_urls,
)
from .transforms import (
    ArrayClip,
    Clip,
    fix_length,
    loudness,
    normalize_loudness,
    peak_limit,
    process_excerpt,
    random_phase_shift,
    salient_excerpt,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "MANIFEST_GROUPS",
    "PAPER_GROUP_WEIGHTS",
    "ArrayClip",
    "AudioFileSource",
    "AudioFolderSource",
    "AudioSource",
    "Clip",
    "DataConfig",
    "DecodeError",
    "Excerpt",
    "ExcerptDataset",
    "FileClip",
    "GroupConfig",
    "HFDatasetSource",
    "Record",
    "ResidentAudio",
    "ResidentBatches",
    "SkipCounter",
    "SourceGroup",
    "URLFolderSource",
    "WebDatasetSource",
    "build_sources",
    "build_validation_set",
    "decode_bytes",
    "decode_file",
    "expand_urls",
    "fix_length",
    "loudness",
    "mixture",
    "normalize_loudness",
    "peak_limit",
    "process_excerpt",
    "random_phase_shift",
    "read_manifest",
    "salient_excerpt",
    "sources_from_manifest",
]
