"""audiotok: audio to discrete tokens and back, with the Improved RVQGAN (DAC) codec."""

from .codedataset import CodeDataset
from .codefile import CodeFile
from .config import PRESETS, DACConfig
from .identity import CodecIdentity
from .model import DAC
from .tokenizer import AudioTokenizer, EncodedAudio

__version__ = "0.1.0"

__all__ = ["AudioTokenizer", "EncodedAudio", "CodeFile", "CodeDataset", "CodecIdentity", "DACConfig", "DAC", "PRESETS",
           "__version__"]
